"""The four position layouts on worked examples (DESIGN.md formulas; docs/model.md)."""

import pytest
import torch

from imontage.models.common.positions import (
    SegmentGrid,
    editverse4d_positions,
    grid_coordinates,
    montage_positions,
    sample_positions,
    shared_positions,
    video3d_positions,
)


def text(length: int) -> SegmentGrid:
    return SegmentGrid("text", "condition", (length, 1, 1))


def image(role: str, h: int, w: int) -> SegmentGrid:
    return SegmentGrid("image", role, (1, h, w))


def test_video3d_each_segment_on_its_own_grid() -> None:
    segments = [text(2), SegmentGrid("video", "target", (2, 1, 2)), image("condition", 1, 2)]
    expected = [
        [0, 0, 0, 0], [0, 0, 0, 0],                                  # text at the origin
        [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0, 1],      # video: (t, h, w)
        [0, 0, 0, 0], [0, 0, 0, 1],                                  # image restarts at t = 0
    ]  # fmt: skip
    assert video3d_positions(segments).tolist() == expected


def test_montage_six_inputs_five_outputs_of_different_resolutions() -> None:
    """iMontage, V = 32, A = B = 8: inputs at floor(k·7/5), outputs at 24 + floor(k·7/4)."""
    sizes_in = [(2, 2), (1, 3), (2, 1), (3, 2), (1, 1), (2, 3)]
    sizes_out = [(1, 2), (2, 2), (3, 1), (1, 1), (2, 4)]
    segments = [text(3)] + [image("condition", h, w) for h, w in sizes_in]
    segments += [image("target", h, w) for h, w in sizes_out]
    positions = montage_positions(segments, virtual_frames=32, head_window=8, tail_window=8)

    assert positions[:3].tolist() == [[0, 0, 0, 0]] * 3
    offset = 3
    for (h, w), t in zip(sizes_in + sizes_out, [0, 1, 2, 4, 5, 7] + [24, 25, 27, 29, 31], strict=True):
        block = positions[offset : offset + h * w]
        expected = torch.cat(
            [torch.zeros(h * w, 1, dtype=torch.int64), grid_coordinates((1, h, w), t)], dim=1
        )
        assert block.tolist() == expected.tolist(), (h, w, t)
        offset += h * w
    assert offset == positions.shape[0]


def test_montage_single_images_sit_at_window_starts() -> None:
    positions = montage_positions([image("condition", 1, 1), image("target", 1, 1)], 16, 4, 6)
    assert positions.tolist() == [[0, 0, 0, 0], [0, 10, 0, 0]]  # t = 0 and t = V − B = 10


def test_montage_has_no_image_limit() -> None:
    segments = [image("condition", 1, 1) for _ in range(20)] + [image("target", 1, 1) for _ in range(12)]
    t = montage_positions(segments)[:, 1].tolist()
    assert t[:20] == [(k * 7) // 19 for k in range(20)]
    assert t[20:] == [24 + (k * 7) // 11 for k in range(12)]


def test_shared_conditions_reuse_the_target_positions() -> None:
    target = SegmentGrid("video", "target", (5, 2, 3))
    keyframe = SegmentGrid("image", "condition", (1, 2, 3), anchor=0)
    clip = SegmentGrid("video", "condition", (2, 2, 3), anchor=3)
    positions = shared_positions([text(1), target, keyframe, clip])
    target_pos = positions[1:31]
    assert target_pos[:, 1].unique().tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(positions[31:37], target_pos[0:6])  # frame 0 of the target
    assert torch.equal(positions[37:49], target_pos[18:30])  # frames 3 and 4 of the target
    assert positions[0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (SegmentGrid("image", "condition", (1, 2, 3)), "no anchor"),
        (SegmentGrid("image", "condition", (1, 2, 2), anchor=0), "same \\(h, w\\) grid"),
        (SegmentGrid("video", "condition", (2, 2, 3), anchor=4), "outside"),
    ],
)
def test_shared_rejects_conditions_it_cannot_place(condition: SegmentGrid, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shared_positions([SegmentGrid("video", "target", (5, 2, 3)), condition])


def test_editverse4d_counts_sequence_steps() -> None:
    segments = [text(2), image("condition", 1, 2), SegmentGrid("video", "target", (2, 1, 1)), text(1)]
    expected = [
        [0, 0, 0, 0], [1, 0, 0, 0],      # +1 per text token
        [2, 0, 0, 0], [2, 0, 0, 1],      # one s for the whole image; t = 0, (h, w) grid
        [3, 0, 0, 0], [3, 1, 0, 0],      # the video: s = 3, t = frame
        [4, 0, 0, 0],                    # text after it continues counting
    ]  # fmt: skip
    assert editverse4d_positions(segments).tolist() == expected


@pytest.mark.parametrize("layout", ["video3d", "montage", "shared", "editverse4d"])
def test_every_layout_gives_int32_rows_per_token(layout: str) -> None:
    segments = [text(4), SegmentGrid("image", "condition", (1, 2, 2), anchor=1), image("target", 2, 2)]
    if layout == "shared":  # the anchor must fall inside a multi-frame target
        segments[2] = SegmentGrid("video", "target", (2, 2, 2))
    positions = sample_positions(layout, segments)
    assert positions.dtype == torch.int32 and positions.shape == (sum(s.num_tokens for s in segments), 4)

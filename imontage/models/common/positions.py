"""The four position layouts: (s, t, h, w) integer coordinates for every token of a sample.

Each layout is a function from a sample's segment grids to ``[N, 4]`` int32 positions, in the
sample's token order. The formulas are DESIGN.md's; docs/model.md works examples through.
Axes a layout does not use are 0, and a token whose coordinates are all 0 is not rotated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

S, T, H, W = range(4)


@dataclass(frozen=True)
class SegmentGrid:
    """What a layout needs of a segment: its kind, role, token grid and anchor."""

    kind: str  # "text" | "image" | "video" | "latent"
    role: str  # "condition" | "target"
    grid: tuple[int, int, int]  # (T', H', W') patches for visual segments; (L, 1, 1) for text
    anchor: int | None = None  # `shared`: the target frame this condition starts at

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def is_text(self) -> bool:
        return self.kind == "text"


def grid_coordinates(grid: tuple[int, int, int], t_offset: int = 0) -> torch.Tensor:
    """``[T'·H'·W', 3]`` (t, h, w) of a patch grid in token order (t slowest, w fastest)."""
    t, h, w = torch.meshgrid(
        torch.arange(grid[0]) + t_offset, torch.arange(grid[1]), torch.arange(grid[2]), indexing="ij"
    )
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def _assemble(
    segments: Sequence[SegmentGrid], visual: Callable[[int, SegmentGrid], torch.Tensor]
) -> torch.Tensor:
    """Text tokens at the origin; visual segment ``i`` gets ``visual(i, seg)`` as its (t, h, w)."""
    parts = []
    for index, segment in enumerate(segments):
        pos = torch.zeros(segment.num_tokens, 4, dtype=torch.int32)
        if not segment.is_text:
            pos[:, T:] = visual(index, segment)
        parts.append(pos)
    return torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.int32)


def video3d_positions(segments: Sequence[SegmentGrid]) -> torch.Tensor:
    """Each visual segment on its own grid from the origin; s = 0; text at the origin."""
    return _assemble(segments, lambda _, seg: grid_coordinates(seg.grid))


def _spread(k: int, count: int, window: int) -> int:
    # floor(k·(window−1)/(count−1)), and 0 for a single image.
    return 0 if count == 1 else (k * (window - 1)) // (count - 1)


def montage_positions(
    segments: Sequence[SegmentGrid], virtual_frames: int = 32, head_window: int = 8, tail_window: int = 8
) -> torch.Tensor:
    """iMontage: images are pseudo-frames of a virtual clip of ``virtual_frames`` latent frames.

    Condition image k of n_in sits at t = floor(k·(A−1)/(n_in−1)), target image k of n_out at
    t = V − B + floor(k·(B−1)/(n_out−1)); each keeps its own (h, w) grid. Any number of images.
    A clip (more than one latent frame) keeps its own frames t = 0..T'−1, as the video model it
    comes from sees it, and does not count among the images.
    """
    rank_in_role: dict[int, int] = {}
    seen = {"condition": 0, "target": 0}
    for index, seg in enumerate(segments):
        if not seg.is_text and seg.grid[0] == 1:
            rank_in_role[index] = seen[seg.role]
            seen[seg.role] += 1
    n_in, n_out = seen["condition"], seen["target"]

    def frame(index: int, seg: SegmentGrid) -> torch.Tensor:
        if index not in rank_in_role:
            return grid_coordinates(seg.grid)
        k = rank_in_role[index]
        if seg.role == "condition":
            t = _spread(k, n_in, head_window)
        else:
            t = virtual_frames - tail_window + _spread(k, n_out, tail_window)
        return grid_coordinates(seg.grid, t_offset=t)

    return _assemble(segments, frame)


def shared_positions(segments: Sequence[SegmentGrid]) -> torch.Tensor:
    """DreaMontage Shared-RoPE: conditions reuse the (t, h, w) of the target tokens they condition.

    The target takes t = 0..T'−1; a condition frame or clip anchored at target frame f takes
    t = f + i, on the target's own (h, w) grid.
    """
    _check_shared(segments)

    def frame(index: int, seg: SegmentGrid) -> torch.Tensor:
        if seg.role == "target":
            return grid_coordinates(seg.grid)
        assert seg.anchor is not None  # _check_shared
        return grid_coordinates(seg.grid, t_offset=seg.anchor)

    return _assemble(segments, frame)


def _check_shared(segments: Sequence[SegmentGrid]) -> None:
    """One target, and every condition anchored inside it on its (h, w) grid."""
    targets = [seg for seg in segments if not seg.is_text and seg.role == "target"]
    if len(targets) != 1:
        raise ValueError(f"shared layout: expected exactly one target segment, got {len(targets)}")
    target = targets[0]
    for index, seg in enumerate(segments):
        if seg.is_text or seg.role == "target":
            continue
        if seg.anchor is None:
            raise ValueError(f"shared layout: condition segment {index} has no anchor frame")
        if seg.grid[1:] != target.grid[1:]:
            raise ValueError(
                f"shared layout: condition segment {index} has patch grid {seg.grid[1:]}, "
                f"the target {target.grid[1:]}; shared positions need the same (h, w) grid"
            )
        if not seg.anchor >= 0 or seg.anchor + seg.grid[0] > target.grid[0]:
            raise ValueError(
                f"shared layout: condition segment {index} spans frames {seg.anchor}.."
                f"{seg.anchor + seg.grid[0] - 1}, outside the target's 0..{target.grid[0] - 1}"
            )


def editverse4d_positions(segments: Sequence[SegmentGrid]) -> torch.Tensor:
    """EditVerse: s counts sequence steps (+1 per text token, +1 per visual segment).

    t is the frame inside the segment (0 for images and text), h and w the patch row and column.
    """
    parts = []
    step = 0
    for segment in segments:
        pos = torch.zeros(segment.num_tokens, 4, dtype=torch.int32)
        if segment.is_text:
            pos[:, S] = torch.arange(step, step + segment.num_tokens)
            step += segment.num_tokens
        else:
            pos[:, S] = step
            pos[:, T:] = grid_coordinates(segment.grid)
            step += 1
        parts.append(pos)
    return torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.int32)


LAYOUTS = ("video3d", "montage", "shared", "editverse4d")


def check_layout(layout: str, segments: Sequence[SegmentGrid]) -> None:
    """Raise the ValueError :func:`sample_positions` would raise for ``segments``, building
    nothing: a data loader checks a sample's grids so before any of its tokens exist."""
    if layout not in LAYOUTS:
        raise _unknown_layout(layout)
    if layout == "shared":
        _check_shared(segments)


def _unknown_layout(layout: str) -> ValueError:
    return ValueError(f"unknown position layout '{layout}' (layouts: {', '.join(LAYOUTS)})")


def sample_positions(
    layout: str,
    segments: Sequence[SegmentGrid],
    virtual_frames: int = 32,
    head_window: int = 8,
    tail_window: int = 8,
) -> torch.Tensor:
    """``[N, 4]`` int32 positions of a sample's tokens under ``layout``."""
    if layout == "video3d":
        return video3d_positions(segments)
    if layout == "montage":
        return montage_positions(segments, virtual_frames, head_window, tail_window)
    if layout == "shared":
        return shared_positions(segments)
    if layout == "editverse4d":
        return editverse4d_positions(segments)
    raise _unknown_layout(layout)

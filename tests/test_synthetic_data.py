"""The embedded synthetic data: deterministic shards, even task mix, edits the instruction determines."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imontage.dataprep.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    EDIT_CANVAS,
    EDIT_OPS,
    EDIT_SHAPE_SIZE,
    MOVE_STEP,
    QUADRANTS,
    VIDEO_CANVAS,
    Shape,
    edit_example,
    make_sample,
    render,
    sample_rng,
    write_shards,
    wrong_edit,
)

REPO = Path(__file__).resolve().parents[1]


def tar_members(out_dir: Path) -> dict[str, bytes]:
    """Every member of every shard in ``out_dir``, by name."""
    members = {}
    for path in sorted(out_dir.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return members


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # [H, W, 3]


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.glob("train-*.tar"))}


def test_writing_is_byte_identical(tmp_path: Path) -> None:
    first = write_shards(tmp_path / "a", samples=24, per_shard=7, seed=3, progress=False)
    second = write_shards(tmp_path / "b", samples=24, per_shard=7, seed=3, progress=False)
    assert first == second
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert len(shard_bytes(tmp_path / "a")) == 4
    other_seed = write_shards(tmp_path / "c", samples=24, per_shard=7, seed=4, progress=False)
    assert other_seed["bytes"] != first["bytes"] or shard_bytes(tmp_path / "c") != shard_bytes(tmp_path / "a")


def test_tar_headers_carry_no_time_or_owner(tmp_path: Path) -> None:
    write_shards(tmp_path, samples=6, per_shard=6, seed=0, progress=False)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        infos = tar.getmembers()
    assert [info.name for info in infos][:3] == ["000000.0.png", "000000.1.png", "000000.json"]
    assert {(info.mtime, info.uid, info.gid, info.uname, info.gname) for info in infos} == {(0, 0, 0, "", "")}
    assert not list(tmp_path.glob("*.partial"))


def test_samples_do_not_depend_on_shard_size(tmp_path: Path) -> None:
    write_shards(tmp_path / "seven", samples=20, per_shard=7, seed=5, progress=False)
    write_shards(tmp_path / "five", samples=20, per_shard=5, seed=5, progress=False)
    seven, five = tar_members(tmp_path / "seven"), tar_members(tmp_path / "five")
    assert len(seven) > 40
    assert seven == five


def test_rewriting_with_fewer_shards_removes_stale_ones(tmp_path: Path) -> None:
    write_shards(tmp_path, samples=24, per_shard=7, seed=0, progress=False)
    write_shards(tmp_path, samples=24, per_shard=12, seed=0, progress=False)
    assert sorted(shard_bytes(tmp_path)) == ["train-000000.tar", "train-000001.tar"]


def test_summary_counts_tasks_round_robin(tmp_path: Path) -> None:
    summary = write_shards(tmp_path, samples=25, per_shard=7, seed=0, tasks=["video", "edit"], progress=False)
    assert summary["samples"] == 25
    assert summary["shards"] == 4
    assert summary["tasks"] == {"video": 13, "edit": 12}
    assert summary["bytes"] == sum(len(data) for data in shard_bytes(tmp_path).values())
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    members = tar_members(tmp_path)
    tasks = [json.loads(members[f"{index:06d}.json"])["task"] for index in range(25)]
    assert tasks == ["video", "edit"] * 12 + ["video"]


@pytest.mark.parametrize("task", ["edit", "montage", "video"])
def test_every_image_is_a_multiple_of_eight(task: str) -> None:
    for index in range(12):
        record, members = make_sample(index, seed=1, task=task)
        assert record["task"] == task and record["text"]
        assert {name for name in members} == {f"{i}.png" for i in range(len(members))}
        for data in members.values():
            height, width, _ = png_pixels(data).shape
            assert height % 8 == 0 and width % 8 == 0


def apply_instruction(instruction: str, before: tuple[Shape, ...]) -> tuple[Shape, ...]:
    """The edit an instruction asks for, read from its words alone (independent of the generator)."""
    words = instruction.split()

    def named(colour: str, kind: str) -> int:
        matches = [i for i, shape in enumerate(before) if (shape.colour, shape.kind) == (colour, kind)]
        assert len(matches) == 1, f"'{instruction}' does not name exactly one shape of {before}"
        return matches[0]

    op = words[0]
    if op == "recolour":  # recolour the <colour> <kind> <colour>
        index = named(words[2], words[3])
        return tuple(
            dataclasses.replace(s, colour=words[4]) if i == index else s for i, s in enumerate(before)
        )
    if op == "move":  # move the <colour> <kind> <direction>
        index = named(words[2], words[3])
        dx, dy = DIRECTIONS[words[4]]
        return tuple(
            s.shifted(dx * MOVE_STEP, dy * MOVE_STEP) if i == index else s for i, s in enumerate(before)
        )
    if op == "remove":  # remove the <colour> <kind>
        index = named(words[2], words[3])
        return before[:index] + before[index + 1 :]
    if op == "add":  # add a <colour> <kind> at the <vertical> <horizontal>
        x, y = QUADRANTS[" ".join(words[-2:])]
        return (*before, Shape(words[3], words[2], x, y, EDIT_SHAPE_SIZE))
    raise AssertionError(f"unknown instruction '{instruction}'")


def test_instruction_determines_the_edited_image() -> None:
    ops_seen = set()
    for index in range(0, 120, 3):
        record, members = make_sample(index, seed=7, task="edit")
        example = edit_example(sample_rng(7, index))
        assert record["text"] == example.instruction
        condition, target = png_pixels(members["0.png"]), png_pixels(members["1.png"])
        assert np.array_equal(condition, render(example.before, EDIT_CANVAS, example.background))
        expected = apply_instruction(example.instruction, example.before)
        assert np.array_equal(target, render(expected, EDIT_CANVAS, example.background)), example.instruction
        assert not np.array_equal(condition, target)
        ops_seen.add(example.instruction.split()[0])
    assert ops_seen == set(EDIT_OPS)


def test_edit_pair_prefers_the_instructed_edit_to_a_wrong_one_of_the_same_kind() -> None:
    """Winner: the edit the instruction asks for; loser: that kind of edit done wrong, or none at all."""
    ops_seen, unchanged = set(), 0
    for index in range(60):
        record, members = make_sample(index, seed=5, task="edit_pair")
        rng = sample_rng(5, index)
        example = edit_example(rng)
        wrong = wrong_edit(rng, example)
        assert record["text"] == example.instruction
        assert [(s["role"], s["member"], s.get("group")) for s in record["segments"]] == [
            ("condition", "0.png", None),
            ("target", "1.png", "win"),
            ("target", "2.png", "lose"),
        ]
        condition, win, lose = (png_pixels(members[f"{i}.png"]) for i in range(3))
        assert np.array_equal(condition, render(example.before, EDIT_CANVAS, example.background))
        right = apply_instruction(example.instruction, example.before)
        assert np.array_equal(win, render(right, EDIT_CANVAS, example.background)), example.instruction
        assert np.array_equal(lose, render(wrong, EDIT_CANVAS, example.background))
        assert not np.array_equal(win, lose)
        op = example.instruction.split()[0]
        ops_seen.add(op)
        if wrong == example.before:  # no wrong edit of this kind fits the scene: the instruction ignored
            unchanged += 1
            continue
        changed = {shape for shape in wrong if shape not in example.before}  # shapes the wrong edit made
        gone = [shape for shape in example.before if shape not in wrong]
        if op == "add":  # the named shape, in another quadrant
            assert len(wrong) == len(example.before) + 1 and not gone
            [added] = changed
            assert (added.colour, added.kind) == (right[-1].colour, right[-1].kind) and added != right[-1]
        elif op == "remove":  # another shape removed
            assert len(gone) == 1 and not changed and gone[0] in right
        else:  # recolour (another colour) or move (another direction): the named shape, changed otherwise
            [index_changed] = [
                i for i, (a, b) in enumerate(zip(example.before, right, strict=True)) if a != b
            ]
            assert len(gone) == 1 and gone[0] == example.before[index_changed]
            [made] = changed
            assert made.kind == right[index_changed].kind and made != right[index_changed]
            if op == "recolour":
                assert (made.x, made.y) == (gone[0].x, gone[0].y) and made.colour != gone[0].colour
            else:
                assert made.colour == gone[0].colour and (made.x, made.y) != (gone[0].x, gone[0].y)
    assert ops_seen == set(EDIT_OPS)
    assert unchanged < 20  # the fallback is the exception


def test_pair_shards_count_preference_pairs(tmp_path: Path) -> None:
    summary = write_shards(
        tmp_path, samples=6, per_shard=4, seed=0, tasks=["edit", "edit_pair"], progress=False
    )
    assert summary["tasks"] == {"edit": 3, "edit_pair": 3} and summary["pairs"] == 3


@pytest.mark.parametrize("seed", range(8))
def test_recolour_changes_exactly_the_named_shape(seed: int) -> None:
    example = edit_example(sample_rng(seed, 0), op="recolour")
    _, old_colour, kind, new_colour = example.instruction.split()[1:]
    (shape,) = [s for s in example.before if (s.colour, s.kind) == (old_colour, kind)]
    before = render(example.before, EDIT_CANVAS, example.background)  # [H, W, 3]
    after = render(example.after, EDIT_CANVAS, example.background)
    alone = render([shape], EDIT_CANVAS, example.background)
    shape_mask = (alone != np.array(BACKGROUNDS[example.background])).any(axis=-1)  # [H, W]
    changed = (before != after).any(axis=-1)
    assert shape_mask.sum() > 20
    assert np.array_equal(changed, shape_mask)
    assert (before[shape_mask] == COLOURS[old_colour]).all()
    assert (after[shape_mask] == COLOURS[new_colour]).all()


def shape_centre(pixels: np.ndarray, colour: str) -> np.ndarray:
    """(row, column) centroid of the pixels of ``colour``."""
    rows, columns = np.nonzero((pixels == COLOURS[colour]).all(axis=-1))
    assert rows.size > 0
    return np.array([rows.mean(), columns.mean()])


def test_video_frames_move_as_the_caption_says() -> None:
    for index in range(6):
        record, members = make_sample(index, seed=2, task="video")
        the, colour, _, moves, direction = record["text"].split()
        assert (the, moves) == ("the", "moves")
        condition, video = record["segments"]
        assert (condition["role"], condition["kind"], condition["member"]) == ("condition", "image", "0.png")
        assert (video["role"], video["kind"], video["frames"]) == (
            "target",
            "video",
            ["1.png", "2.png", "3.png", "4.png"],
        )
        frames = [png_pixels(members[f"{i}.png"]) for i in range(5)]
        assert {frame.shape for frame in frames} == {(*VIDEO_CANVAS, 3)}
        steps = np.diff([shape_centre(frame, colour) for frame in frames], axis=0)  # [4, 2] (dy, dx)
        dx, dy = DIRECTIONS[direction]
        assert np.allclose(steps, steps[0]), "velocity is constant"
        assert np.sign(steps[0]).tolist() == [dy, dx]


def test_montage_has_conditions_then_targets() -> None:
    shapes_of_records = set()
    for index in range(12):
        record, members = make_sample(index, seed=2, task="montage")
        roles = [segment["role"] for segment in record["segments"]]
        conditions, targets = roles.count("condition"), roles.count("target")
        assert roles == ["condition"] * conditions + ["target"] * targets
        assert 2 <= conditions <= 3 and 1 <= targets <= 2
        assert {png_pixels(data).shape for data in members.values()} == {(32, 48, 3)}
        shapes_of_records.add(record["text"].count(" moves "))
    assert shapes_of_records == {1, 2}


def test_cli_writes_shards_and_prints_the_summary(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "tools/make_synthetic.py", "--out", str(tmp_path), "--samples", "12"]
    command += ["--per-shard", "5", "--tasks", "edit,montage", "--seed", "1"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "12 samples in 3 shards" in result.stdout
    assert "edit 6, montage 6" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["tasks"] == {"edit": 6, "montage": 6}
    assert sorted(shard_bytes(tmp_path)) == [f"train-00000{i}.tar" for i in range(3)]

    bad = subprocess.run(
        command[:-4] + ["--tasks", "edit,paint"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "paint" in bad.stderr


LATENT_SCALE = 8  # spatial compression of the VAEs the latent presets train behind (Wan, HunyuanVideo)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs/model").glob("*.yaml")))
def test_every_shipped_preset_can_patchify_every_task(preset: str) -> None:
    """Every image and frame of every task divides into the preset's patches: in pixels for a
    pixel model (3 channels, dit_tiny), as a latent of 1/8 the size for the others."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs/model" / f"{preset}.yaml")
    _, ph, pw = cfg.patch_size
    scale = 1 if cfg.in_channels == 3 else LATENT_SCALE
    for index, task in enumerate(("edit", "montage", "video", "edit_pair")):
        _, members = make_sample(index, 0, task)
        for name, data in members.items():
            height, width, _ = png_pixels(data).shape
            assert height % (scale * ph) == 0 and width % (scale * pw) == 0, (task, name, height, width)

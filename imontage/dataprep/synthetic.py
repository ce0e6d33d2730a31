"""Embedded synthetic data: coloured shapes on small flat canvases, written as WebDataset shards.

Three tasks, each small enough to train on a laptop CPU and exact enough to check by eye:

- ``edit``: a 32x32 scene of 1-3 shapes and an instruction (recolour, move, add or remove one
  shape) -> the edited scene. (colour, shape) pairs are distinct within a scene, so the
  instruction names exactly one shape and fully determines the target.
- ``montage``: 1-2 shapes moving at constant velocity on a 32x48 canvas; 2-3 frames are
  conditions and the next 1-2 frames are targets, all as separate images.
- ``video``: the first 32x32 frame of one moving shape is the condition image; the next 4
  frames are one target video segment.

Every canvas is a multiple of 16 pixels on each side, so that every shipped model preset trains
on it: in pixels (``dit_tiny`` patchifies by 4) and as latents of a VAE that compresses 8x
spatially (Wan, HunyuanVideo), patchified by (1, 2, 2) (``wan_tiny``, ``hunyuan_video_tiny``, the
1B-14B presets). ``tests/test_synthetic_data.py`` checks this against ``configs/model/``.

One preference task, for flow DPO (not in the default mix; ``--tasks edit_pair``):

- ``edit_pair``: an edit whose target is a pair sharing the scene and instruction: the correct
  edit (``group: win``) and a wrong one (``group: lose``): the wrong colour, direction, quadrant
  or shape, or the scene left unchanged where no other edit of that kind fits.

Sample ``i`` is drawn from its own RNG seeded from ``(seed, i)``, so it is the same whatever
the shard size. Shards are byte-identical for the same arguments: tar headers carry no times
or owners, and PNG encoding has no metadata.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from imontage.data.shards import tar_member_info

RGB = tuple[int, int, int]

TASKS = ("edit", "montage", "video")
PAIR_TASKS = ("edit_pair",)  # preference pairs: written only when asked for
ALL_TASKS = (*TASKS, *PAIR_TASKS)
SHAPE_KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, RGB] = {"dark": (24, 24, 32), "light": (232, 232, 224)}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EDIT_OPS = ("recolour", "move", "add", "remove")

EDIT_CANVAS = (32, 32)  # (H, W)
EDIT_SHAPE_SIZE = 10
MOVE_STEP = 8  # pixels a "move" instruction shifts a shape by
# "add ... at the <quadrant>" puts the shape centred in that quadrant: its box's top-left corner.
QUADRANTS: dict[str, tuple[int, int]] = {
    "top left": (3, 3),
    "top right": (19, 3),
    "bottom left": (3, 19),
    "bottom right": (19, 19),
}
MONTAGE_CANVAS = (32, 48)
MONTAGE_SHAPE_SIZE = 10
VIDEO_CANVAS = (32, 32)
VIDEO_SHAPE_SIZE = 8
VIDEO_TARGET_FRAMES = 4

SHARD_PATTERN = "train-{:06d}.tar"
SHARD_NAME = re.compile(r"train-(\d{6})\.tar")
SUMMARY_FILE = "summary.json"
_MAX_DRAWS = 1000  # rejection-sampling attempts before a scene is declared impossible


@dataclass(frozen=True)
class Shape:
    """A filled shape inside the square box of side ``size`` whose top-left pixel is (x, y)."""

    kind: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def shifted(self, dx: int, dy: int) -> Shape:
        return dataclasses.replace(self, x=self.x + dx, y=self.y + dy)

    def inside(self, canvas: tuple[int, int]) -> bool:
        height, width = canvas
        return 0 <= self.x <= width - self.size and 0 <= self.y <= height - self.size

    def overlaps(self, other: Shape, gap: int = 1) -> bool:
        """Whether the boxes come closer than ``gap`` pixels (touching shapes read as one)."""
        return (
            self.x < other.x + other.size + gap
            and other.x < self.x + self.size + gap
            and self.y < other.y + other.size + gap
            and other.y < self.y + self.size + gap
        )


def render(shapes: Iterable[Shape], canvas: tuple[int, int], background: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels: the shapes drawn in order on a flat background, no anti-aliasing."""
    height, width = canvas
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        left, top = shape.x, shape.y
        right, bottom = shape.x + shape.size - 1, shape.y + shape.size - 1
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind '{shape.kind}'")
    return np.asarray(image)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of ``[H, W, 3]`` uint8 pixels; PIL writes no time or other metadata."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def sample_rng(seed: int, index: int) -> random.Random:
    """The RNG sample ``index`` is drawn from: independent of shard size and of other samples."""
    return random.Random(seed * 1_000_003 + index)


def _random_shape(rng: random.Random, kind: str, colour: str, canvas: tuple[int, int], size: int) -> Shape:
    height, width = canvas
    return Shape(kind, colour, rng.randint(0, width - size), rng.randint(0, height - size), size)


def _random_pairs(rng: random.Random, count: int, taken: Sequence[Shape] = ()) -> list[tuple[str, str]]:
    """``count`` distinct (colour, kind) pairs not already in ``taken``."""
    used = {(shape.colour, shape.kind) for shape in taken}
    free = [(colour, kind) for colour in COLOURS for kind in SHAPE_KINDS if (colour, kind) not in used]
    return rng.sample(free, count)


def random_scene(rng: random.Random, count: int, canvas: tuple[int, int], size: int) -> tuple[Shape, ...]:
    """``count`` shapes with distinct (colour, kind) pairs, placed so that no two touch."""
    shapes: list[Shape] = []
    for colour, kind in _random_pairs(rng, count):
        for _ in range(_MAX_DRAWS):
            shape = _random_shape(rng, kind, colour, canvas, size)
            if not any(shape.overlaps(other) for other in shapes):
                shapes.append(shape)
                break
        else:
            raise RuntimeError(f"cannot place {count} shapes of size {size} apart on a {canvas} canvas")
    return tuple(shapes)


# ---------------------------------------------------------------------------------------------
# edit


@dataclass(frozen=True)
class EditExample:
    instruction: str
    background: str
    before: tuple[Shape, ...]
    after: tuple[Shape, ...]


EditDraw = tuple[str, tuple[Shape, ...], tuple[Shape, ...]]  # (instruction, before, after)


def _edit_scene(rng: random.Random, smallest: int, largest: int) -> tuple[Shape, ...]:
    return random_scene(rng, rng.randint(smallest, largest), EDIT_CANVAS, EDIT_SHAPE_SIZE)


def _replace_at(shapes: tuple[Shape, ...], index: int, shape: Shape) -> tuple[Shape, ...]:
    return shapes[:index] + (shape,) + shapes[index + 1 :]


def _draw_recolour(rng: random.Random) -> EditDraw | None:
    before = _edit_scene(rng, 1, 3)
    index = rng.randrange(len(before))
    shape = before[index]
    # The new pair must stay unique, or a later instruction could not name the shape.
    taken = {(other.colour, other.kind) for other in before}
    colours = [colour for colour in COLOURS if (colour, shape.kind) not in taken]
    colour = rng.choice(colours)
    after = _replace_at(before, index, dataclasses.replace(shape, colour=colour))
    return f"recolour the {shape.name} {colour}", before, after


def _draw_move(rng: random.Random) -> EditDraw | None:
    before = _edit_scene(rng, 1, 3)
    moves = []
    for index, shape in enumerate(before):
        others = before[:index] + before[index + 1 :]
        for direction, (dx, dy) in DIRECTIONS.items():
            moved = shape.shifted(dx * MOVE_STEP, dy * MOVE_STEP)
            if moved.inside(EDIT_CANVAS) and not any(moved.overlaps(other) for other in others):
                moves.append((index, direction, moved))
    if not moves:
        return None
    index, direction, moved = rng.choice(moves)
    return f"move the {before[index].name} {direction}", before, _replace_at(before, index, moved)


def _draw_add(rng: random.Random) -> EditDraw | None:
    before = _edit_scene(rng, 1, 2)
    [(colour, kind)] = _random_pairs(rng, 1, taken=before)
    slots = {name: Shape(kind, colour, x, y, EDIT_SHAPE_SIZE) for name, (x, y) in QUADRANTS.items()}
    free = [name for name, shape in slots.items() if not any(shape.overlaps(other) for other in before)]
    if not free:
        return None
    quadrant = rng.choice(free)
    return f"add a {colour} {kind} at the {quadrant}", before, (*before, slots[quadrant])


def _draw_remove(rng: random.Random) -> EditDraw | None:
    before = _edit_scene(rng, 1, 3)
    index = rng.randrange(len(before))
    return f"remove the {before[index].name}", before, before[:index] + before[index + 1 :]


_EDIT_DRAWS: dict[str, Callable[[random.Random], EditDraw | None]] = {
    "recolour": _draw_recolour,
    "move": _draw_move,
    "add": _draw_add,
    "remove": _draw_remove,
}


def edit_example(rng: random.Random, op: str | None = None) -> EditExample:
    """One edit: a scene, an instruction naming one shape, and the scene after the edit."""
    background = rng.choice(list(BACKGROUNDS))
    op = op or rng.choice(EDIT_OPS)
    if op not in _EDIT_DRAWS:
        raise ValueError(f"unknown edit op '{op}' (ops: {', '.join(EDIT_OPS)})")
    for _ in range(_MAX_DRAWS):
        drawn = _EDIT_DRAWS[op](rng)
        if drawn is not None:
            instruction, before, after = drawn
            return EditExample(instruction, background, before, after)
    raise RuntimeError(f"no feasible '{op}' edit found in {_MAX_DRAWS} scenes")


def _wrong_recolour(rng: random.Random, before: tuple[Shape, ...], index: int, right: Shape) -> Shape | None:
    taken = {(other.colour, other.kind) for other in before}
    colours = [c for c in COLOURS if c != right.colour and (c, right.kind) not in taken]
    return dataclasses.replace(right, colour=rng.choice(colours)) if colours else None


def _wrong_move(rng: random.Random, before: tuple[Shape, ...], index: int, right: Shape) -> Shape | None:
    others = before[:index] + before[index + 1 :]
    moves = [
        before[index].shifted(dx * MOVE_STEP, dy * MOVE_STEP) for dx, dy in DIRECTIONS.values()
    ]  # the right move is among them
    moves = [
        m for m in moves if m != right and m.inside(EDIT_CANVAS) and not any(m.overlaps(o) for o in others)
    ]
    return rng.choice(moves) if moves else None


def wrong_edit(rng: random.Random, example: EditExample) -> tuple[Shape, ...]:
    """A wrong result of ``example``'s instruction: the same kind of edit done wrong, or no edit at all.

    Recolour: another colour; move: another direction; add: another free quadrant; remove: another
    shape. Where no such alternative fits, the scene unchanged (the instruction ignored).
    """
    before, after = example.before, example.after
    if len(after) > len(before):  # add: the new shape elsewhere
        added = after[-1]
        slots = [dataclasses.replace(added, x=x, y=y) for x, y in QUADRANTS.values()]
        free = [s for s in slots if s != added and not any(s.overlaps(other) for other in before)]
        return (*before, rng.choice(free)) if free else before
    if len(after) < len(before):  # remove: another shape removed
        kept = set(after)
        others = [i for i, shape in enumerate(before) if shape in kept]
        if not others:
            return before
        index = rng.choice(others)
        return before[:index] + before[index + 1 :]
    [index] = [i for i, (old, new) in enumerate(zip(before, after, strict=True)) if old != new]
    right = after[index]
    wrong = (_wrong_recolour if right.colour != before[index].colour else _wrong_move)(
        rng, before, index, right
    )
    return before if wrong is None else _replace_at(before, index, wrong)


# ---------------------------------------------------------------------------------------------
# motion (montage and video)


@dataclass(frozen=True)
class Motion:
    """A shape moving ``speed`` pixels per frame towards ``direction``; ``start`` is frame 0."""

    start: Shape
    direction: str
    speed: int

    def at(self, frame: int) -> Shape:
        dx, dy = DIRECTIONS[self.direction]
        return self.start.shifted(dx * self.speed * frame, dy * self.speed * frame)


@dataclass(frozen=True)
class MotionExample:
    caption: str
    background: str
    canvas: tuple[int, int]
    frames: tuple[tuple[Shape, ...], ...]  # the shapes of each frame


def _random_motion(
    rng: random.Random, colour: str, kind: str, canvas: tuple[int, int], size: int, frames: int, speed: int
) -> Motion:
    """A motion whose shape stays fully on the canvas for all ``frames`` frames."""
    height, width = canvas
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    travel = speed * (frames - 1)
    # The start box leaves room for the whole travel on the side the shape moves towards.
    x = rng.randint(max(0, -dx * travel), width - size - max(0, dx * travel))
    y = rng.randint(max(0, -dy * travel), height - size - max(0, dy * travel))
    return Motion(Shape(kind, colour, x, y, size), direction, speed)


def motion_example(
    rng: random.Random,
    canvas: tuple[int, int],
    num_shapes: int,
    num_frames: int,
    size: int,
    speeds: tuple[int, int],
    article: str,
) -> MotionExample:
    """``num_frames`` frames of ``num_shapes`` shapes at constant velocity, and a caption naming them."""
    background = rng.choice(list(BACKGROUNDS))
    motions = [
        _random_motion(rng, colour, kind, canvas, size, num_frames, rng.randint(*speeds))
        for colour, kind in _random_pairs(rng, num_shapes)
    ]
    caption = " and ".join(f"{article} {m.start.name} moves {m.direction}" for m in motions)
    frames = tuple(tuple(m.at(frame) for m in motions) for frame in range(num_frames))
    return MotionExample(caption, background, canvas, frames)


def render_frames(example: MotionExample) -> list[np.ndarray]:
    """One ``[H, W, 3]`` uint8 array per frame."""
    return [render(shapes, example.canvas, example.background) for shapes in example.frames]


# ---------------------------------------------------------------------------------------------
# samples and shards

Members = dict[str, bytes]  # member name inside the sample ("0.png") -> bytes


def _image(role: str, member: str) -> dict[str, Any]:
    return {"role": role, "kind": "image", "member": member}


def _png_members(frames: Sequence[np.ndarray]) -> Members:
    return {f"{i}.png": encode_png(pixels) for i, pixels in enumerate(frames)}


def _edit_sample(rng: random.Random) -> tuple[str, list[dict[str, Any]], Members]:
    example = edit_example(rng)
    frames = [render(shapes, EDIT_CANVAS, example.background) for shapes in (example.before, example.after)]
    return (
        example.instruction,
        [_image("condition", "0.png"), _image("target", "1.png")],
        _png_members(frames),
    )


def _edit_pair_sample(rng: random.Random) -> tuple[str, list[dict[str, Any]], Members]:
    """The scene as condition; targets: the right edit (``win``) and a wrong one (``lose``)."""
    example = edit_example(rng)
    scenes = (example.before, example.after, wrong_edit(rng, example))
    frames = [render(shapes, EDIT_CANVAS, example.background) for shapes in scenes]
    segments = [
        _image("condition", "0.png"),
        {**_image("target", "1.png"), "group": "win"},
        {**_image("target", "2.png"), "group": "lose"},
    ]
    return example.instruction, segments, _png_members(frames)


def _montage_sample(rng: random.Random) -> tuple[str, list[dict[str, Any]], Members]:
    num_conditions, num_targets = rng.randint(2, 3), rng.randint(1, 2)
    example = motion_example(
        rng, MONTAGE_CANVAS, rng.randint(1, 2), num_conditions + num_targets, MONTAGE_SHAPE_SIZE, (2, 4), "a"
    )
    segments = [
        _image("condition" if i < num_conditions else "target", f"{i}.png")
        for i in range(num_conditions + num_targets)
    ]
    return example.caption, segments, _png_members(render_frames(example))


def _video_sample(rng: random.Random) -> tuple[str, list[dict[str, Any]], Members]:
    example = motion_example(rng, VIDEO_CANVAS, 1, 1 + VIDEO_TARGET_FRAMES, VIDEO_SHAPE_SIZE, (2, 3), "the")
    video = {
        "role": "target",
        "kind": "video",
        "frames": [f"{i}.png" for i in range(1, 1 + VIDEO_TARGET_FRAMES)],
    }
    return example.caption, [_image("condition", "0.png"), video], _png_members(render_frames(example))


_SAMPLE_BUILDERS = {
    "edit": _edit_sample,
    "montage": _montage_sample,
    "video": _video_sample,
    "edit_pair": _edit_pair_sample,
}


def make_sample(index: int, seed: int, task: str) -> tuple[dict[str, Any], Members]:
    """Sample ``index`` of ``task``: its json record and its image members by name."""
    if task not in _SAMPLE_BUILDERS:
        raise ValueError(f"unknown task '{task}' (tasks: {', '.join(ALL_TASKS)})")
    text, segments, members = _SAMPLE_BUILDERS[task](sample_rng(seed, index))
    return {"task": task, "text": text, "segments": segments}, members


def sample_key(index: int) -> str:
    return f"{index:06d}"


def task_of(index: int, tasks: Sequence[str]) -> str:
    """Tasks go round-robin by sample index, so any prefix of the data set is evenly mixed."""
    return tasks[index % len(tasks)]


def sample_files(index: int, seed: int, task: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample, ``<key>.<member>``, in sorted order."""
    record, members = make_sample(index, seed, task)
    files = {"json": json.dumps(record, ensure_ascii=False).encode("utf-8"), **members}
    key = sample_key(index)
    return [(f"{key}.{name}", files[name]) for name in sorted(files)]


def write_tar(path: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """Write a deterministic tar; it appears under ``path`` only once complete."""
    partial = path.with_name(path.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in files:
                tar.addfile(tar_member_info(name, len(data)), io.BytesIO(data))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _remove_stale_shards(out_dir: Path, num_shards: int) -> None:
    # Shards of an earlier, larger run would otherwise be read along with this one by `train-*.tar`.
    for path in out_dir.iterdir():
        match = SHARD_NAME.fullmatch(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()


def write_shards(
    out_dir: str | os.PathLike[str],
    samples: int,
    per_shard: int,
    seed: int,
    tasks: Sequence[str] = TASKS,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``samples`` samples into ``train-NNNNNN.tar`` shards and ``summary.json``; return the summary."""
    unknown = [task for task in tasks if task not in ALL_TASKS]
    if unknown or not tasks:
        raise ValueError(
            f"tasks must be a non-empty list drawn from {', '.join(ALL_TASKS)}, got {list(tasks)}"
        )
    if samples < 0 or per_shard < 1:
        raise ValueError(f"need samples >= 0 and per_shard >= 1, got {samples} and {per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    shard_bytes = 0
    starts = range(0, samples, per_shard)
    with tqdm(total=samples, desc="synthetic samples", unit="sample", disable=not progress) as bar:
        for shard, start in enumerate(starts):
            indices = range(start, min(start + per_shard, samples))
            path = out / SHARD_PATTERN.format(shard)
            write_tar(path, _shard_files(indices, seed, tasks, counts, bar))
            shard_bytes += path.stat().st_size
    _remove_stale_shards(out, len(starts))
    summary = {
        "samples": samples,
        "shards": len(starts),
        "bytes": shard_bytes,
        "tasks": {task: counts[task] for task in tasks},
        "pairs": sum(counts[task] for task in PAIR_TASKS),  # preference pairs (win + lose targets)
        "seed": seed,
        "per_shard": per_shard,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _shard_files(
    indices: range, seed: int, tasks: Sequence[str], counts: Counter[str], bar: tqdm
) -> Iterable[tuple[str, bytes]]:
    for index in indices:
        task = task_of(index, tasks)
        yield from sample_files(index, seed, task)
        counts[task] += 1
        bar.update(1)


def format_summary(summary: dict[str, Any]) -> str:
    per_task = ", ".join(f"{task} {count}" for task, count in summary["tasks"].items())
    pairs = f"; {summary['pairs']} preference pairs" if summary.get("pairs") else ""
    return (
        f"wrote {summary['samples']} samples in {summary['shards']} shards "
        f"({summary['bytes']:,} bytes); per task: {per_task}{pairs}"
    )

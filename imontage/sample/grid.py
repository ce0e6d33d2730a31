"""PNG grids: one row per sample, conditions | generated | ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

GAP = 4  # pixels between cells
SEPARATOR = 12  # pixels between the column groups


def to_frames(x: torch.Tensor) -> list[np.ndarray]:
    """``[3, T, H, W]`` in [-1, 1] -> T frames ``[H, W, 3]`` uint8.

    A latent segment (other than 3 channels) is previewed by its first three channels (the first
    repeated when it has fewer): normalised latents have unit scale, so [-1, 1] shows their
    structure. ``imontage-sample --vae`` decodes them to real pixels.
    """
    if x.shape[0] != 3:
        x = x[[0, 1, 2] if x.shape[0] >= 3 else [0, 0, 0]]
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [pixels[:, i].permute(1, 2, 0).numpy() for i in range(pixels.shape[1])]


def make_grid(rows: Sequence[Sequence[Sequence[torch.Tensor]]], background: int = 255) -> np.ndarray:
    """Lay out ``rows[r][group]`` = list of ``[3, T, H, W]`` segments; returns ``[H, W, 3]`` uint8.

    Groups (conditions, generated, ground truth) are set apart by a wider gap; every frame of a
    video becomes its own cell.
    """
    return frame_grid(
        [[[frame for seg in group for frame in to_frames(seg)] for group in row] for row in rows], background
    )


def frame_grid(row_cells: Sequence[Sequence[Sequence[np.ndarray]]], background: int = 255) -> np.ndarray:
    """:func:`make_grid` of frames already made cells: ``row_cells[r][group]`` = list of ``[H, W, 3]``
    uint8 frames (:func:`to_frames`), as a caller that keeps a long video's frames 8-bit holds them."""
    heights = [max((c.shape[0] for group in row for c in group), default=0) for row in row_cells]
    widths = [
        sum(c.shape[1] + GAP for group in row for c in group) + SEPARATOR * max(len(row) - 1, 0)
        for row in row_cells
    ]
    canvas = np.full(
        (sum(heights) + GAP * (len(row_cells) + 1), max(widths, default=0) + GAP, 3), background, np.uint8
    )
    y = GAP
    for row, height in zip(row_cells, heights, strict=True):
        x = GAP
        for group_index, group in enumerate(row):
            if group_index:
                x += SEPARATOR
            for cell in group:
                canvas[y : y + cell.shape[0], x : x + cell.shape[1]] = cell
                x += cell.shape[1] + GAP
        y += height + GAP
    return canvas


def save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(image).save(tmp)
    tmp.replace(path)


def preview_rows(
    samples: list[Any], outputs: list[list[torch.Tensor | None]]
) -> list[list[list[torch.Tensor]]]:
    """Grid rows: [conditions, generated targets, ground-truth targets] per sample."""
    rows = []
    for sample, generated in zip(samples, outputs, strict=True):
        conditions = [s.data for s in sample.segments if s.kind != "text" and s.role == "condition"]
        targets = [s.data for s in sample.segments if s.role == "target"]
        made = [out for s, out in zip(sample.segments, generated, strict=True) if s.role == "target"]
        rows.append([conditions, made, targets])
    return rows

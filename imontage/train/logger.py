"""Where a run's numbers go: TensorBoard, ``RUN_DIR/metrics.jsonl`` and the console."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


class RunLogger:
    """Scalars to TensorBoard and, one JSON line per step, to metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.metrics = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train", jsonl: bool = True) -> None:
        """TensorBoard ``prefix/name`` scalars; with ``jsonl``, one metrics.jsonl line as well."""
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if jsonl:
            self.record(step, values)

    def record(self, step: int, values: dict[str, Any]) -> None:
        """One metrics.jsonl line; :func:`read_metrics` merges the lines of one step."""
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """``image``: ``[H, W, 3]`` uint8."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        self.metrics.flush()

    def close(self) -> None:
        self.writer.close()
        self.metrics.close()


class NullLogger:
    """The logger of ranks other than 0: they compute the same numbers, rank 0 writes them."""

    writer = None

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train", jsonl: bool = True) -> None:
        """Rank 0 writes the scalars."""

    def record(self, step: int, values: dict[str, Any]) -> None:
        """Rank 0 writes metrics.jsonl."""

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Rank 0 writes the images."""

    def flush(self) -> None:
        """Nothing buffered."""

    def close(self) -> None:
        """Nothing open."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of ``RUN_DIR/metrics.jsonl``: the lines of one step (training's, validation's)
    merged, a later line's value of a key winning (a step logged again after a resume)."""
    path = run_dir / "metrics.jsonl"
    records: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records.setdefault(record["step"], {}).update(record)
    return [records[step] for step in sorted(records)]

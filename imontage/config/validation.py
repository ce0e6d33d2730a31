"""Held-out validation settings: the recipe's ``validation:`` section and each stage's overrides.

A stage validates on its own held-out shards, one set per task, at fixed timesteps and with noise
drawn from ``seed`` (never from the training generator), so the numbers repeat under every parallel
layout and after a resume. The trainer's side is :mod:`imontage.train.validation`. This module
imports nothing of imontage above the models, so the recipe schema embeds
:class:`ValidationConfig` and the loader runs :func:`check_validation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ValidationDatasetConfig:
    """One task's held-out shards."""

    # The name its numbers are logged under (val/loss/<task>); when the stage trains on a mixture
    # (data.datasets), one of the mixture's dataset names.
    task: str = MISSING
    shards: str = MISSING  # globs, brace ranges, paths or `pipe:` commands, as data.shards


@dataclass
class ValidationConfig:
    every: int = 0  # validate every N global steps; 0: only at_start (if set)
    at_start: bool = False  # also before a stage's first step (the weights it starts from); not on resume
    datasets: list[ValidationDatasetConfig] = field(default_factory=list)
    max_samples: int = 16  # per task: the first shard items in stored order (a preference pair is one)
    batch_size: int = 4  # samples per forward pass (a flow_dpo stage: even, pairs kept whole)
    # t each held-out sample is noised at (the t the model sees, after flow_matching.shift); every
    # sample is evaluated at every one and the losses pooled.
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 0  # the noise's own seed: sample i at timestep j draws from (seed, i, j)
    preview_every: int = 0  # sample a grid from the held-out samples every N steps; 0: never
    preview_samples: int = 4  # taken in turn from each task (flow_dpo: the pairs' winners)


Origin = Callable[[str], str]


def check_validation(
    section: Any,
    where: Callable[[str], str],
    origin: Origin,
    stage_datasets: Sequence[str],
    objective: str,
    expert_ranges: Sequence[tuple[float, float]],
    error: type[ValueError],
) -> None:
    """Checks the schema's types cannot express, on one stage's merged ``validation`` section.

    ``where(key)`` is the full key a sub-key was set under (``validation.every`` or, overridden by
    the stage, ``stages[1].validation.every``); ``origin`` names the file that set it;
    ``stage_datasets`` are the names of the stage's data mixture (empty for one ``data.shards``).
    """

    def check(condition: bool, key: str, reason: str) -> None:
        if not condition:
            full = where(key)
            raise error(f"{origin(full)}: key '{full}': {reason}")

    for key in ("every", "preview_every"):
        check(section[key] >= 0, key, "must be >= 0")
    for key in ("max_samples", "batch_size", "preview_samples"):
        check(section[key] >= 1, key, "must be >= 1")
    enabled = section.every > 0 or section.at_start or section.preview_every > 0
    check(
        not enabled or len(section.datasets) > 0,
        "datasets",
        "validation is on (every, at_start or preview_every) but no held-out shards are declared",
    )
    tasks = [str(dataset.task) for dataset in section.datasets]
    for index, dataset in enumerate(section.datasets):
        key = f"datasets[{index}]"
        check(
            bool(dataset.task) and tasks.count(dataset.task) == 1,
            f"{key}.task",
            "must be unique and non-empty",
        )
        check(
            not stage_datasets or dataset.task in stage_datasets,
            f"{key}.task",
            f"unknown task '{dataset.task}': the stage's data mixture has {', '.join(stage_datasets)}",
        )
        check(bool(dataset.shards), f"{key}.shards", "must name held-out shards")
    timesteps = [float(t) for t in section.timesteps]
    check(len(timesteps) > 0, "timesteps", "needs at least one t")
    check(all(0.0 < t < 1.0 for t in timesteps), "timesteps", f"{timesteps}: each t must be in (0, 1)")
    outside = [t for t in timesteps if not any(low <= t < high for low, high in expert_ranges)]
    check(
        not (enabled and outside),  # the defaults need not fit an expert's range while validation is off
        "timesteps",
        f"{outside} outside the trained model's range of t {[list(r) for r in expert_ranges]} (model.expert)",
    )
    check(
        objective != "flow_dpo" or section.batch_size % 2 == 0,
        "batch_size",
        f"{section.batch_size}: a flow_dpo stage validates preference pairs, two samples each: use an even size",
    )

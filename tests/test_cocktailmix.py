"""CocktailMix: the task frequencies a run sees follow the mixture schedule; per-task losses are logged."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from imontage.config import load_recipe
from imontage.data.mixture import MixtureSchedule
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

TASKS = ("edit", "montage", "video")
POINTS = [
    (0, {"edit": 1.0}),
    (40, {"edit": 1.0, "montage": 1.0}),
    (80, {"edit": 1.0, "montage": 1.0, "video": 3.0}),
]
STEPS = 120


@pytest.fixture(scope="module")
def per_task_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    for task in TASKS:
        subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(root / task), "--tasks", task,
                        "--samples", "24", "--no-progress"], cwd=REPO, check=True)  # fmt: skip
    return {task: root / task for task in TASKS}


def mixture_override() -> str:
    points = ", ".join(
        f"{{step: {step}, weights: {{{', '.join(f'{k}: {v}' for k, v in weights.items())}}}}}"
        for step, weights in POINTS
    )
    return f"data.mixture=[{points}]"


def test_task_frequencies_follow_the_schedule(tmp_path: Path, per_task_shards: dict[str, Path]) -> None:
    datasets = ", ".join(f"{{name: {t}, shards: '{per_task_shards[t]}/train-*.tar'}}" for t in TASKS)
    cfg = load_recipe(
        REPO / "configs/recipes/imontage_cocktailmix.yaml",
        [f"run_dir={tmp_path / 'run'}", f"data.datasets=[{datasets}]", mixture_override(),
         f"stages.cocktailmix.steps={STEPS}", "data.max_tokens=768", "model.depth=1", "train.sample.every=0",
         "train.checkpoint.every=0", "train.progress=false", "train.ema_decay=0"],
    )  # fmt: skip
    records = read_metrics(train(cfg))
    assert len(records) == STEPS
    schedule = MixtureSchedule(TASKS, [0.0] * len(TASKS), POINTS)
    # One dataset per batch: compare the batches of each task with the schedule, window by window.
    for first, last in ((1, 40), (41, 80), (81, 120)):
        window = records[first - 1 : last]
        for index, task in enumerate(TASKS):
            probabilities = [schedule.weights(r["step"] - 1) for r in window]  # the loader draws at step - 1
            p = [w[index] / sum(w) for w in probabilities]
            expected, spread = sum(p), math.sqrt(sum(q * (1 - q) for q in p))
            observed = sum(1 for r in window if r.get(f"task_samples/{task}", 0) > 0)
            assert abs(observed - expected) <= 4 * spread + 1e-9, (
                task,
                first,
                last,
                observed,
                expected,
                spread,
            )
    assert all(f"task_loss/{t}" in records[-1] or f"task_samples/{t}" not in records[-1] for t in TASKS)
    seen = {t for r in records for t in TASKS if f"task_loss/{t}" in r}
    assert seen == set(TASKS)  # every task trained and its loss logged

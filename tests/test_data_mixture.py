"""A weighted mixture of datasets whose weights follow the training step, resumable exactly."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from imontage.config.schema import DataConfig, DatasetConfig, MixturePoint
from imontage.data import build_loader
from imontage.data.loader import MixtureLoader
from imontage.data.mixture import MixtureSchedule, draw_dataset
from imontage.dataprep.synthetic import write_shards
from imontage.models.common.sequence import PackingSpec

SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="montage")


def test_schedule_is_piecewise_linear_and_constant_outside() -> None:
    schedule = MixtureSchedule(["a", "b"], [1.0, 1.0], [(10, {"a": 1.0}), (20, {"a": 1.0, "b": 3.0})])
    assert schedule.weights(0) == [1.0, 0.0]
    assert schedule.weights(15) == [1.0, 1.5]
    assert schedule.weights(20) == schedule.weights(10**6) == [1.0, 3.0]
    assert MixtureSchedule(["a", "b"], [2.0, 1.0]).weights(5) == [2.0, 1.0]
    with pytest.raises(ValueError, match=r"unknown datasets \['c'\]"):
        MixtureSchedule(["a", "b"], [1.0, 1.0], [(0, {"c": 1.0})])


def test_draws_follow_the_weights() -> None:
    draws = Counter(draw_dataset([1.0, 3.0, 0.0], seed=0, rank=0, draw=i) for i in range(4000))
    assert draws[2] == 0 and abs(draws[1] / 4000 - 0.75) < 0.03
    assert [draw_dataset([1.0, 1.0], 0, 0, i) for i in range(20)] == [
        draw_dataset([1.0, 1.0], 0, 0, i) for i in range(20)
    ]
    assert [draw_dataset([1.0, 1.0], 0, 0, i) for i in range(20)] != [
        draw_dataset([1.0, 1.0], 0, 1, i) for i in range(20)
    ]


@pytest.fixture(scope="module")
def per_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("tasks")
    for task in ("edit", "video"):
        write_shards(out / task, samples=24, per_shard=8, seed=1, tasks=[task], progress=False)
    return {task: str(out / task / "train-*.tar") for task in ("edit", "video")}


def mixture_config(per_task: dict[str, str]) -> DataConfig:
    return DataConfig(
        datasets=[DatasetConfig(name=task, shards=shards) for task, shards in per_task.items()],
        mixture=[MixturePoint(step=0, weights={"edit": 1.0}), MixturePoint(step=100, weights={"video": 1.0})],
        batch_size=2,
        shuffle_buffer=4,
    )


def tasks_at(loader: MixtureLoader, step: int, count: int) -> list[str]:
    chosen = []
    for _ in range(count):
        loader.set_step(step)
        next(loader)
        assert loader.last is not None
        assert set(loader.last.tasks) == {loader.last.dataset}  # each batch comes from one dataset
        chosen.append(loader.last.dataset)
    return chosen


def test_mixture_moves_from_one_dataset_to_the_other(per_task: dict[str, str]) -> None:
    loader = build_loader(mixture_config(per_task), SPEC)
    assert isinstance(loader, MixtureLoader)
    assert set(tasks_at(loader, 0, 10)) == {"edit"}
    halfway = Counter(tasks_at(loader, 50, 40))
    assert 10 <= halfway["video"] <= 30
    assert set(tasks_at(loader, 100, 10)) == {"video"}
    metrics = loader.metrics()
    assert metrics["weight/video"] == 1.0 and metrics["batches/edit"] + metrics["batches/video"] == 60


def test_mixture_resumes_exactly(per_task: dict[str, str], tmp_path: Path) -> None:
    def run(loader: MixtureLoader, steps: range) -> list[tuple[str, list]]:
        out = []
        for step in steps:
            loader.set_step(step)
            next(loader)
            assert loader.last is not None
            out.append((loader.last.dataset, loader.last.keys))
        return out

    cfg = mixture_config(per_task)
    straight = run(build_loader(cfg, SPEC), range(40, 70))  # type: ignore[arg-type]
    first = build_loader(cfg, SPEC)
    assert isinstance(first, MixtureLoader)
    run(first, range(40, 52))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, SPEC)
    resumed.load_state_dict(state)
    assert run(resumed, range(52, 70)) == straight[12:]  # type: ignore[arg-type]

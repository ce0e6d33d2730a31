"""Shared fixtures and helpers: the repository root, a tiny model configuration, a poisoned objective."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from imontage.config.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a ``slow`` test run first, each module's tests in their order.

    `make test`'s workers (pytest-xdist, ``--dist loadfile --no-loadscope-reorder``) take whole
    modules in collection order, the next when one is almost done; a long module taken last (the
    two-host SLURM cases take about five minutes) would leave the other worker idle at the end.
    Taken first, the short modules fill in behind them. (xdist's default order, most tests first,
    put the two-host module and the quickstart near the end.)"""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order is otherwise kept


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """A module on one intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``, its
    module fixtures included), as each of run_ranks's ranks runs.

    The tests' models are tiny: on two idle cores a second thread gains about a quarter (a step of
    test_sar's keyframe model: 72 ms against 95 ms), but beside other processes (2-rank launches,
    the stress scripts' busy ones) its spin-waiting made steps 16 to 30 times slower (4.6 s against
    0.15 s). Modules of many short models, where that matters more than the idle gain, use it.
    `make test` runs every module on one thread (``OMP_NUM_THREADS=1``: its two workers are each
    other's busy process); this keeps those modules on one when pytest is run by hand.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_model_config(**changes: object) -> DictConfig:
    """A DiT small enough for unit tests (head dim 8: 4 rotary pairs)."""
    cfg = OmegaConf.structured(ModelConfig)
    values = {
        "in_channels": 3,
        "patch_size": [1, 4, 4],
        "hidden_size": 32,
        "depth": 2,
        "num_heads": 4,
        "mlp_hidden_size": 64,
        "text_dim": 16,
        "max_text_len": 32,
        "rope": {"bands": [1, 1, 1, 1]},
        "positions": {"layout": "montage"},
    }
    values.update(changes)
    return OmegaConf.merge(cfg, values)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A shard spec over 256 samples of the embedded synthetic data, written once per session.

    Tests must not read ``data/synthetic`` (made by ``make quickstart``): a fresh clone has none.
    """
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [sys.executable, "tools/make_synthetic.py", "--out", str(out), "--samples", "256", "--no-progress"],
        cwd=REPO,
        check=True,
    )
    return f"{out}/train-*.tar"


@pytest.fixture(scope="session")
def wan_lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DictConfig]:
    """(diffusers folder, final checkpoint, recipe) of a LoRA run on a tiny random Wan: 3 steps of
    the local engine from model.init_from_diffusers (test_lora_export.train_wan_lora)."""
    from test_lora_export import train_wan_lora

    return train_wan_lora(tmp_path_factory.mktemp("wan_lora"))  # type: ignore[return-value]


@pytest.fixture(scope="session")
def pooled_text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two image-to-video samples (a 32x48 image, then a 5-frame clip: latents [4, 1, 4, 6] and
    [4, 2, 4, 6]) with UMT5 text, CLIP pooled text, and the empty negative prompt's, encoded once:
    ``ROOT/latents/pixels-*.tar``, ``ROOT/latents/negative.safetensors``, ``ROOT/models/vae``."""
    from conditioned_shards import i2v_samples, write_conditioned_shards

    folder = tmp_path_factory.mktemp("pooled_text_shards")
    write_conditioned_shards(folder, [i2v_samples(2)], i2v=False, negative_prompt="")
    return folder


class PoisonedObjective:
    """An objective whose loss is NaN wherever ``poison()`` says so; everything else (the step's
    range of t, the objective's attributes) is the wrapped objective's."""

    def __init__(self, objective: Any, poison: Callable[[], bool]) -> None:
        self.objective, self.poison = objective, poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def __call__(self, *args: Any) -> Any:
        output = self.objective(*args)
        if self.poison():
            output.loss = output.loss * float("nan")
        return output

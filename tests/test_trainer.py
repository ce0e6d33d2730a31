"""The trainer: run artifacts, bit-exact resume, checkpoints without a manifest, stage chaining."""

from pathlib import Path

import pytest
import torch
from conftest import REPO

from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.dataprep.synthetic import write_shards
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

TINY = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.depth=2",
    "model.mlp_hidden_size=64",
    "model.text_dim=16",
    "model.rope.bands=[0,3,3,2]",
    "data.batch_size=3",
    "data.shuffle_buffer=8",
    "flow_matching.text_dropout=0.5",
    "optim.warmup_steps=3",
    "train.progress=false",
    "train.ema_decay=0.9",
    "train.sample.every=5",
    "train.sample.num_samples=2",
    "train.sample.steps=2",
    "train.checkpoint.every=0",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("synthetic")
    write_shards(out, samples=20, per_shard=7, seed=0, progress=False)
    return str(out / "train-*.tar")


def run(run_dir: Path, shards: str, *overrides: str) -> Path:
    recipe = REPO / "configs/recipes/quickstart.yaml"
    cfg = load_recipe(recipe, [*TINY, f"data.shards={shards}", f"run_dir={run_dir}", *overrides])
    return train(cfg)


def final_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = ckpt.find_resume_checkpoint(run_dir / "checkpoints")
    assert path is not None
    return ckpt.load_checkpoint(path)[0]


def assert_same_run(a: Path, b: Path) -> None:
    losses_a = [(r["step"], r["loss"]) for r in read_metrics(a)]
    losses_b = [(r["step"], r["loss"]) for r in read_metrics(b)]
    assert losses_a == losses_b  # bit for bit: floats compared exactly
    tensors_a, tensors_b = final_tensors(a), final_tensors(b)
    for group in ("model", "ema", "optimizer"):
        assert tensors_a[group].keys() == tensors_b[group].keys()
        for name in tensors_a[group]:
            assert torch.equal(tensors_a[group][name], tensors_b[group][name]), (group, name)


def test_run_leaves_config_tensorboard_checkpoint_and_samples(tmp_path: Path, shards: str) -> None:
    run_dir = run(tmp_path / "run", shards, "stages.sft.steps=5")
    assert "hidden_size: 32" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    assert latest == "step_000005"
    ckpt.verify_checkpoint(run_dir / "checkpoints" / latest)
    assert (run_dir / "samples/step_000005.png").stat().st_size > 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_resume_is_bit_exact(tmp_path: Path, shards: str) -> None:
    """20 steps straight == 10 steps, stop, resume=auto, 10 more: losses and final weights."""
    straight = run(tmp_path / "straight", shards, "stages.sft.steps=20")
    resumed = tmp_path / "resumed"
    run(resumed, shards, "stages.sft.steps=20", "train.stop_at_step=10")
    assert (resumed / "checkpoints/latest").read_text().strip() == "step_000010"
    assert [r["step"] for r in read_metrics(resumed)][-1] == 10
    run(resumed, shards, "stages.sft.steps=20")
    assert_same_run(straight, resumed)


def test_resume_never_picks_a_checkpoint_without_manifest(tmp_path: Path, shards: str) -> None:
    straight = run(tmp_path / "straight", shards, "stages.sft.steps=12")
    broken = tmp_path / "broken"
    run(broken, shards, "stages.sft.steps=12", "train.checkpoint.every=6", "train.stop_at_step=12")
    # step_000012 loses its manifest (a crash before it was written): resume must use step_000006.
    (broken / "checkpoints/step_000012" / ckpt.MANIFEST).unlink()
    assert ckpt.find_resume_checkpoint(broken / "checkpoints") == broken / "checkpoints/step_000006"
    run(broken, shards, "stages.sft.steps=12", "train.checkpoint.every=6")
    assert ckpt.is_complete(broken / "checkpoints/step_000012")
    assert_same_run(straight, broken)


def test_stages_run_in_order_and_resume_inside_the_second(tmp_path: Path, shards: str) -> None:
    stages = (
        "stages=[{name: warm, objective: flow_matching, steps: 6},"
        " {name: main, objective: flow_matching, steps: 8, optim: {lr: 0.0005, warmup_steps: 2}}]"
    )
    straight = run(tmp_path / "straight", shards, stages)
    records = read_metrics(straight)
    assert [r["step"] for r in records] == list(range(1, 15))
    assert records[6]["lr"] == pytest.approx(0.0005 / 2)  # stage two restarts its warmup at its own LR
    for stop in (6, 9):  # at the stage boundary, and inside the second stage
        resumed = tmp_path / f"resumed_at_{stop}"
        run(resumed, shards, stages, f"train.stop_at_step={stop}")
        assert [r["step"] for r in read_metrics(resumed)][-1] == stop
        run(resumed, shards, stages)
        assert_same_run(straight, resumed)


def test_bf16_autocast_tracks_fp32(tmp_path: Path, shards: str) -> None:
    runs = {
        p: run(tmp_path / p, shards, "stages.sft.steps=4", f"train.precision={p}") for p in ("fp32", "bf16")
    }
    fp32, bf16 = ([r["loss"] for r in read_metrics(runs[p])] for p in ("fp32", "bf16"))
    assert bf16 != fp32  # autocast did run in bf16...
    assert bf16 == pytest.approx(fp32, rel=0.05)  # ...and tracks the fp32 run
    model = final_tensors(runs["bf16"])["model"]
    assert all(t.dtype == torch.float32 for t in model.values())  # master weights stay fp32


TWO_STAGES = "stages=[{name: sft, objective: flow_matching, steps: 4}, {name: tune, objective: flow_matching, steps: 3, optim: {lr: 0.0005}}]"


def test_stages_run_one_at_a_time_equal_the_chained_run(tmp_path: Path, shards: str) -> None:
    chained = run(tmp_path / "chained", shards, TWO_STAGES)
    one_by_one = tmp_path / "one_by_one"
    run(one_by_one, shards, TWO_STAGES, "stage=sft")
    assert [r["step"] for r in read_metrics(one_by_one)] == [1, 2, 3, 4]
    run(one_by_one, shards, TWO_STAGES, "stage=tune")  # starts from the sft stage's final checkpoint
    assert_same_run(chained, one_by_one)


def test_a_later_stage_alone_needs_the_previous_stages_checkpoint(tmp_path: Path, shards: str) -> None:
    with pytest.raises(
        ckpt.CheckpointError, match=r"step_000004, which is missing or incomplete: run stage=sft first"
    ):
        run(tmp_path / "fresh", shards, TWO_STAGES, "stage=tune")
    with pytest.raises(Exception, match=r"key 'train.only_stage': no stage 'dpo' \(stages: sft, tune\)"):
        run(tmp_path / "fresh", shards, TWO_STAGES, "stage=dpo")

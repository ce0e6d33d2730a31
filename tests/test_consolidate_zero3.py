"""DeepSpeed ZeRO-3 checkpoints on gloo ranks: consolidate, reshard and resume, inspect, verify, sample.

- consolidated weights equal DeepSpeed's own ``zero_to_fp32`` tensor for tensor (TP=1);
- TP=2 and Ulysses CP=2 round trips: the consolidated single-device DiT gives the parallel
  model's outputs on a fixed batch (live and EMA weights; under CP ZeRO-3 partitions over the CP
  ranks, and the EMA forward follows a live one);
- ``reshard`` + resume: DP=2 -> layout-free -> DP=2, and TP=2 -> layout-free -> TP=2, continue
  bit for bit; TP=2 -> one process continues with the TP=2 run's losses (float32 tolerance: the
  two layouts round differently); another DP size is refused;
- a TP=2 × DP=2 run on 4 ranks, through ``convert_checkpoint.py consolidate`` and ``reshard``,
  resumes as TP=1 × DP=2 on 2 ranks with its losses (float32 tolerance);
- a truncated shard, a truncated rank file, a missing file and a wrong config fail naming them;
- ``imontage-sample RUN_DIR`` samples from a 2-rank ZeRO-3 run directory.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from distributed import run_ranks
from safetensors.torch import load_file

from imontage.checkpoint import convert
from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.models import packing_spec
from imontage.untrusted import ConversionError

RECIPE = REPO / "configs/recipes/quickstart.yaml"
STEPS = 4  # checkpoints at 2 (resumed from) and 4


def overrides(run_dir: Path, shards: str, layout: str, *extra: str) -> list[str]:
    return [
        f"data.shards={shards}",
        f"parallel={layout}",
        "parallel.device=cpu",
        f"run_dir={run_dir}",
        f"stages.sft.steps={STEPS}",
        "train.progress=false",
        "train.checkpoint.every=2",
        "train.sample.every=0",
        "data.max_tokens=768",
        *extra,
    ]


def fixed_batch(cfg) -> object:
    """Two preview samples, packed, their target tokens half noised (t = 0.5)."""
    from imontage.data import preview_samples
    from imontage.models.common import pack_samples

    spec = packing_spec(cfg.model)
    batch = pack_samples(preview_samples(cfg.data, 2, spec), spec)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(batch.tokens.shape, generator=generator)
    target = batch.target_mask[:, None]
    return batch.replace(
        tokens=torch.where(target, 0.5 * batch.tokens + 0.5 * noise, batch.tokens),
        timesteps=torch.where(batch.target_mask, 0.5, 0.0),
    )


def train_and_forward(rank: int, world_size: int, options: list[str]) -> dict | None:
    """Train, then the parallel model's outputs on :func:`fixed_batch` (live and EMA weights)."""
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import Trainer

    cfg = load_recipe(RECIPE, options)
    trainer = Trainer(cfg)
    trainer.fit()
    batch = fixed_batch(cfg)
    trainer.model.eval()
    with torch.no_grad():
        live = trainer.model(batch).float().clone()
        with trainer.backend.ema_weights():
            ema = trainer.model(batch).float().clone()
        after = trainer.model(batch).float().clone()  # the live weights again, none of the EMA left
    if rank != 0:
        return None
    losses = [record["loss"] for record in read_metrics(trainer.run_dir)]
    return {"losses": losses, "live": live, "ema": ema, "after": after}


def train_losses(rank: int, world_size: int, options: list[str]) -> list[float]:
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import train

    run_dir = train(load_recipe(RECIPE, options))
    return [record["loss"] for record in read_metrics(run_dir)] if rank == 0 else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, synthetic_shards: str) -> dict[str, tuple[Path, dict]]:
    """One 2-rank training run per layout, with its checkpoints, losses and parallel outputs."""
    root = tmp_path_factory.mktemp("zero3")
    found = {}
    for layout in ("zero3_dp2", "tp2"):
        result = run_ranks(
            train_and_forward, 2, overrides(root / layout, synthetic_shards, layout), timeout=300
        )[0]
        found[layout] = (root / layout, result)
    return found


def checkpoint_of(runs: dict, layout: str, step: int = STEPS) -> Path:
    return runs[layout][0] / "checkpoints" / ckpt.checkpoint_name(step)


def test_consolidated_weights_equal_deepspeeds_zero_to_fp32(runs: dict, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = checkpoint_of(runs, "zero3_dp2")
    ours = load_file(convert.consolidate(checkpoint, tmp_path / "live.safetensors", weights="live"))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name
    tool = convert_tool().main
    assert tool(["consolidate", str(checkpoint), str(tmp_path / "bf16.safetensors"), "--weights", "live",
                 "--dtype", "bf16"]) == 0  # fmt: skip
    bf16 = load_file(tmp_path / "bf16.safetensors")
    assert all(torch.equal(bf16[name], tensor.to(torch.bfloat16)) for name, tensor in theirs.items())
    cfg, metadata = convert.read_consolidated(tmp_path / "live.safetensors")
    assert metadata["step"] == str(STEPS) and metadata["weights"] == "live" and cfg.hidden_size == 128
    assert json.loads(metadata["source_layout"])["data_parallel"] == 2


def test_tp2_consolidated_model_gives_the_parallel_models_outputs(
    runs: dict, tmp_path: Path, synthetic_shards: str
) -> None:
    layout = "tp2"
    run_dir, result = runs[layout]
    cfg = load_recipe(RECIPE, overrides(run_dir, synthetic_shards, layout))
    batch = fixed_batch(cfg)
    for weights in ("live", "ema"):
        out = convert.consolidate(checkpoint_of(runs, layout), tmp_path / f"{weights}.safetensors", weights)
        model, _ = convert.load_consolidated(out)
        with torch.no_grad():
            single = model.eval()(batch).float()
        torch.testing.assert_close(single, result[weights], rtol=1e-4, atol=1e-5)
    live, ema = load_file(tmp_path / "live.safetensors"), load_file(tmp_path / "ema.safetensors")
    assert any(not torch.equal(live[name], ema[name]) for name in live)  # two different weight sets


def test_ulysses2_consolidated_model_gives_the_parallel_models_outputs(
    tmp_path: Path, synthetic_shards: str
) -> None:
    """ZeRO-3 over the DP×CP ranks: under Ulysses CP=2 (DP=1) each CP rank holds a partition.

    The parallel model's EMA forward runs after a live one, which leaves some parameters gathered
    with their live values: the EMA must reach the forward anyway, and the live weights after it.
    """
    layout = "ulysses2"
    options = overrides(tmp_path / layout, synthetic_shards, layout)
    result = run_ranks(train_and_forward, 2, options, timeout=300)[0]
    checkpoint = tmp_path / layout / "checkpoints" / ckpt.checkpoint_name(STEPS)
    assert {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00001.safetensors"} <= {
        path.name for path in checkpoint.iterdir()
    }
    assert json.loads((checkpoint / ckpt.STATE_FILE).read_text())["layout"]["context_parallel"] == 2
    batch = fixed_batch(load_recipe(RECIPE, options))
    for weights in ("live", "ema"):
        model, _ = convert.load_consolidated(
            convert.consolidate(checkpoint, tmp_path / f"{weights}.safetensors", weights)
        )
        with torch.no_grad():
            single = model.eval()(batch).float()
        torch.testing.assert_close(single, result[weights], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(result["live"], result["ema"])
    assert torch.equal(result["after"], result["live"])


def test_reshard_then_resume_under_dp2_continues_bit_for_bit(
    runs: dict, tmp_path: Path, synthetic_shards: str
) -> None:
    resumed = tmp_path / "resumed"
    source = checkpoint_of(runs, "zero3_dp2", 2)
    assert (
        convert_tool().main(["reshard", str(source), str(resumed / "checkpoints"), "--data-parallel", "2"])
        == 0
    )
    losses = run_ranks(train_losses, 2, overrides(resumed, synthetic_shards, "zero3_dp2"), timeout=300)[0]
    assert losses == runs["zero3_dp2"][1]["losses"][2:]  # steps 3-4, through the layout-free checkpoint
    single = tmp_path / "single"
    convert.reshard(checkpoint_of(runs, "zero3_dp2", 2), single / "checkpoints")
    with pytest.raises(ckpt.CheckpointError, match=r"step_000002: holds the data-loader and RNG states of 2"):
        train_losses(0, 1, overrides(single, synthetic_shards, "single"))


def test_reshard_of_tp2_resumes_on_one_process_and_under_tp2(
    runs: dict, tmp_path: Path, synthetic_shards: str
) -> None:
    resumed = tmp_path / "resumed"
    written = convert.reshard(checkpoint_of(runs, "tp2", 2), resumed / "checkpoints", tensor_parallel=1)
    state = json.loads((written / ckpt.STATE_FILE).read_text())
    assert state["resharded_from"]["layout"]["tensor_parallel"] == 2 and len(state["data_ranks"]) == 1
    losses = train_losses(0, 1, overrides(resumed, synthetic_shards, "single"))
    assert losses == pytest.approx(runs["tp2"][1]["losses"][2:], rel=1e-4)
    # Under DeepSpeed each rank cuts its TP slice and ZeRO partition of weights, moments and EMA.
    again = tmp_path / "again"
    convert.reshard(checkpoint_of(runs, "tp2", 2), again / "checkpoints", tensor_parallel=2)
    losses = run_ranks(train_losses, 2, overrides(again, synthetic_shards, "tp2"), timeout=300)[0]
    assert losses == runs["tp2"][1]["losses"][2:]
    with pytest.raises(ConversionError, match=r"saved with data_parallel=1.*not 2"):
        convert.reshard(checkpoint_of(runs, "tp2", 2), tmp_path / "other", data_parallel=2)


@pytest.mark.slow
def test_tp2_dp2_run_resumes_as_tp1_dp2_through_the_tool(tmp_path: Path, synthetic_shards: str) -> None:
    """TP=2 × DP=2 ZeRO-3 on 4 ranks -> consolidate and reshard -> TP=1 × DP=2 on 2 ranks.

    The resumed run's losses at steps 3-4 are the 4-rank run's to float32 tolerance: TP sums the
    row-parallel products across ranks, in another order than one rank's matmul.
    """
    straight = tmp_path / "tp2_dp2"
    losses = run_ranks(train_losses, 4, overrides(straight, synthetic_shards, "tp2"), timeout=300)[0]
    source = straight / "checkpoints" / ckpt.checkpoint_name(2)
    layout = json.loads((source / ckpt.STATE_FILE).read_text())["layout"]
    assert (layout["tensor_parallel"], layout["data_parallel"]) == (2, 2)
    tool = convert_tool().main
    assert tool(["consolidate", str(source), str(tmp_path / "live.safetensors"), "--weights", "live"]) == 0
    resumed = tmp_path / "tp1_dp2"
    assert tool(["reshard", str(source), str(resumed / "checkpoints"), "--tensor-parallel", "1",
                 "--data-parallel", "2"]) == 0  # fmt: skip
    written = resumed / "checkpoints" / ckpt.checkpoint_name(2)
    consolidated, resharded = (
        load_file(tmp_path / "live.safetensors"),
        load_file(written / "model.safetensors"),
    )
    assert all(torch.equal(resharded[name], tensor) for name, tensor in consolidated.items())
    assert len(json.loads((written / ckpt.STATE_FILE).read_text())["data_ranks"]) == 2
    again = run_ranks(train_losses, 2, overrides(resumed, synthetic_shards, "zero3_dp2"), timeout=300)[0]
    assert again == pytest.approx(losses[2:], rel=1e-4)


def test_reading_through_the_mapping_gives_the_same_tensors(
    runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a partition's offset in its file is unknown (off Linux), it is copied through the mapping."""
    from imontage.checkpoint import zero3

    checkpoint = checkpoint_of(runs, "tp2")
    by_range = load_file(convert.consolidate(checkpoint, tmp_path / "range.safetensors", "live"))
    monkeypatch.setattr(zero3, "_file_mappings", lambda path: [])
    mapped = load_file(convert.consolidate(checkpoint, tmp_path / "mapped.safetensors", "live"))
    assert by_range.keys() == mapped.keys()
    assert all(torch.equal(by_range[name], mapped[name]) for name in by_range)


def convert_tool() -> Any:
    """tools/convert_checkpoint.py as a module (its ``main`` runs in this process: no start-up cost)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools/convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_and_verify_read_the_deepspeed_layout(runs: dict, capsys: pytest.CaptureFixture) -> None:
    checkpoint = checkpoint_of(runs, "tp2")
    info = convert.inspect(checkpoint)
    assert info["layout"] == {
        "tensor_parallel": 2,
        "context_parallel": 1,
        "data_parallel": 1,
        "zero_stage": 3,
    }
    assert info["step"] == STEPS and info["parameters"] == 1_062_320
    assert dict((n, s) for n, s, _ in info["tensors"])["blocks.0.qkv.weight"] == (384, 128)
    tool = convert_tool()
    assert tool.main(["inspect", str(checkpoint), "--recipe", str(RECIPE)]) == 0
    shown = capsys.readouterr().out
    assert "1,062,320 parameters" in shown and f"model config vs {RECIPE}: identical" in shown
    assert "layout: tensor_parallel=2 context_parallel=1 data_parallel=1 zero_stage=3" in shown
    assert tool.main(["verify", str(checkpoint)]) == 0
    assert "shards complete" in capsys.readouterr().out


def test_truncated_missing_and_misconfigured_shards_are_named(runs: dict, tmp_path: Path) -> None:
    source = checkpoint_of(runs, "tp2")
    broken = tmp_path / source.name
    shutil.copytree(source, broken)
    shard = broken / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-5000])
    out = tmp_path / "out.safetensors"
    with pytest.raises(ckpt.CheckpointError, match=f"{shard.name}: .* bytes"):  # the manifest's sizes
        convert.consolidate(broken, out)
    with pytest.raises(ConversionError, match=f"{shard.name}: not a readable DeepSpeed"):
        convert.consolidate(broken, out, weights="live", verify=False)
    shutil.copy(source / shard.name, shard)
    (broken / "rank_00001.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"rank_00001\.safetensors: no such file"):
        convert.consolidate(broken, out, verify=False)
    shutil.copy(source / "rank_00001.safetensors", broken)
    rank_file = broken / "rank_00000.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:-64])
    with pytest.raises(ConversionError, match=r"rank_00000\.safetensors: its header declares \d+ bytes"):
        convert.consolidate(broken, out, verify=False)
    shutil.copy(source / rank_file.name, broken)
    state = json.loads((broken / ckpt.STATE_FILE).read_text())
    state["model_config"]["mlp_hidden_size"] = 256
    (broken / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(
        ConversionError,
        match=r"zero_pp_rank_0_mp_rank_00_model_states\.pt: tensor 'blocks\.0\.fc1\.weight' has TP-local shape",
    ):
        convert.consolidate(broken, out, verify=False)
    assert not out.exists()


def test_imontage_sample_reads_a_deepspeed_run(runs: dict, tmp_path: Path) -> None:
    from imontage.sample import cli

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "a red square", "targets": [[32, 32]]}) + "\n")
    out = tmp_path / "grid.png"
    run_dir = runs["zero3_dp2"][0]
    assert cli.main([str(run_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "2"]) == 0
    assert out.is_file()
    model, _ = cli.load_model(checkpoint_of(runs, "tp2"), use_ema=True, device=torch.device("cpu"))
    consolidated, _ = convert.load_consolidated(
        convert.consolidate(checkpoint_of(runs, "tp2"), tmp_path / "ema.safetensors")
    )
    for (name, tensor), other in zip(
        model.state_dict().items(), consolidated.state_dict().values(), strict=True
    ):
        assert torch.equal(tensor, other), name

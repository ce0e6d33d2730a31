"""Checkpoint conversion: consolidate, export/import bit-identical, inspect, verify, named errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_model_config
from omegaconf import OmegaConf
from safetensors.torch import load_file

from imontage.checkpoint import convert
from imontage.checkpoint import store as ckpt
from imontage.checkpoint.tensors import DIFFUSERS_INDEX
from imontage.config.model_file import DIFFUSERS_CONFIG
from imontage.models.dit.model import build_dit
from imontage.untrusted import ConversionError


@pytest.fixture
def training_checkpoint(tmp_path: Path) -> Path:
    """A trainer-format checkpoint of a tiny DiT with distinct live and EMA weights."""
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = build_dit(cfg)
    live = {name: torch.randn(t.shape) for name, t in model.state_dict().items()}
    ema = {name: t * 0.5 for name, t in live.items()}
    state = {"step": 42, "model_config": OmegaConf.to_container(cfg, resolve=True)}
    return ckpt.save_checkpoint(tmp_path / "checkpoints", 42, {"model": live, "ema": ema}, state)


def test_consolidate_picks_ema_or_live_and_casts(training_checkpoint: Path, tmp_path: Path) -> None:
    live = load_file(training_checkpoint / "model.safetensors")
    ema_file = convert.consolidate(training_checkpoint, tmp_path / "ema.safetensors")
    live_file = convert.consolidate(
        training_checkpoint, tmp_path / "live.safetensors", weights="live", dtype="bf16"
    )
    ema, live_bf16 = load_file(ema_file), load_file(live_file)
    for name, tensor in live.items():
        assert torch.equal(ema[name], tensor * 0.5)
        assert torch.equal(live_bf16[name], tensor.to(torch.bfloat16))
    cfg, metadata = convert.read_consolidated(ema_file)
    assert metadata["step"] == "42" and metadata["weights"] == "ema" and cfg.hidden_size == 32
    model, _ = convert.load_consolidated(ema_file)
    assert all(torch.equal(p, ema[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize("max_shard_size", [5 * 2**30, 4000])
def test_export_then_import_is_bit_identical(
    training_checkpoint: Path, tmp_path: Path, max_shard_size: int
) -> None:
    consolidated = convert.consolidate(training_checkpoint, tmp_path / "model.safetensors")
    folder = convert.export_diffusers(consolidated, tmp_path / "export", max_shard_size)
    config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    assert config["_class_name"] == convert.CLASS_NAME and config["hidden_size"] == 32
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    assert (len(shards) > 1) == (max_shard_size == 4000)
    assert (folder / DIFFUSERS_INDEX).is_file() == (len(shards) > 1)
    back = convert.import_diffusers(folder, tmp_path / "back.safetensors")
    original, imported = load_file(consolidated), load_file(back)
    assert original.keys() == imported.keys()
    for name in original:
        assert original[name].dtype == imported[name].dtype and torch.equal(original[name], imported[name])
    assert convert.read_consolidated(back)[1]["step"] == "42"


def test_inspect_counts_and_diffs_against_a_recipe(training_checkpoint: Path) -> None:
    info = convert.inspect(training_checkpoint)
    model = build_dit(tiny_model_config(), device="meta")
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) and info["step"] == 42
    result = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "inspect", str(training_checkpoint),
         "--recipe", "configs/recipes/quickstart.yaml"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"step 42, {info['parameters']:,} parameters" in result.stdout
    assert "hidden_size: 32 != 128" in result.stdout


def test_verify_names_a_flipped_byte(training_checkpoint: Path) -> None:
    run = [sys.executable, "tools/convert_checkpoint.py", "verify", str(training_checkpoint)]
    assert subprocess.run(run, cwd=REPO, capture_output=True).returncode == 0
    shard = training_checkpoint / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "model.safetensors" in result.stderr


def test_wrong_config_missing_shard_and_truncated_file_are_named(
    training_checkpoint: Path, tmp_path: Path
) -> None:
    consolidated = convert.consolidate(training_checkpoint, tmp_path / "model.safetensors")
    folder = convert.export_diffusers(consolidated, tmp_path / "export", max_shard_bytes=4000)
    config_file = folder / DIFFUSERS_CONFIG
    good_config = config_file.read_text()
    config_file.write_text(good_config.replace('"mlp_hidden_size": 64', '"mlp_hidden_size": 96'))
    with pytest.raises(
        ConversionError,
        match=r"model-\d+-of-\d+\.safetensors: tensor 'blocks\.0\.fc1\.(weight|bias)' has shape",
    ):
        convert.import_diffusers(folder, tmp_path / "x.safetensors")
    config_file.write_text(good_config)
    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name}: no such file"):
        convert.import_diffusers(folder, tmp_path / "x.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(consolidated.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="truncated.safetensors"):
        convert.load_consolidated(truncated)

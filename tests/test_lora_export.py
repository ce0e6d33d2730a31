"""A LoRA run's adapters leave as diffusers' LoRA file and as merged diffusers weights.

A tiny random Wan is saved as a diffusers folder; imontage trains adapters on it (local engine,
3 steps from model.init_from_diffusers); ``export-lora`` writes the adapters, which diffusers'
``load_lora_adapter`` puts on the same folder's model; ``export-diffusers`` merges them into the
base. Both give imontage's output (base + adapters) on the same sample.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_diffusers_io import folder_training_overrides, wan_tiny_folder

from imontage.config import load_recipe
from imontage.models import build_model
from imontage.models.common import PackingSpec, Sample, Segment, pack_samples
from imontage.train.trainer import train

RECIPE = Path(__file__).resolve().parents[1] / "configs/recipes/quickstart.yaml"
LORA = ["model.lora.rank=4", "model.lora.alpha=2",
        "model.lora.targets=[blocks.*.attn1.to_q,blocks.*.attn2.to_v,blocks.*.ffn.net.0.proj]",
        "optim.lr=3e-2", "optim.warmup_steps=0", "train.ema_decay=0"]  # fmt: skip


def train_wan_lora(root: Path) -> tuple[Path, Path, object]:
    """(diffusers folder, the run's final checkpoint, its recipe): the session fixture ``wan_lora_run``
    (conftest.py), shared with the tests that sample LoRA runs."""
    from latent_shards import TEXT_DIM, write_latent_shards

    folder = wan_tiny_folder(root / "transformer", text_dim=TEXT_DIM)[0]
    overrides = [
        *folder_training_overrides(folder, write_latent_shards(root / "latents"), root / "run", "single"),
        *LORA,
    ]
    cfg = load_recipe(RECIPE, overrides)
    run_dir = train(cfg)
    return folder, run_dir / "checkpoints/step_000003", cfg


def imontage_with_adapters(folder: Path, checkpoint: Path, cfg: object) -> torch.nn.Module:
    from imontage.checkpoint.diffusers import model_weights

    model = build_model(cfg.model).eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in model_weights(folder, cfg.model):  # type: ignore[attr-defined]
            params[name].copy_(tensor)
    trained = load_file(checkpoint / "model.safetensors")
    missing, unexpected = model.load_state_dict(trained, strict=False)
    assert not unexpected and trained and all(".lora_" in name for name in trained)
    return model


def one_sample(model: torch.nn.Module) -> tuple[dict, torch.Tensor]:
    """diffusers' keyword inputs of one sample and imontage's output on it ``[C, T, H, W]``."""
    from latent_shards import TEXT_DIM

    from imontage.models.common.sequence import unpatchify_segments

    g = torch.Generator().manual_seed(11)
    latents, text, t = torch.randn(4, 2, 4, 4, generator=g), torch.randn(5, TEXT_DIM, generator=g), 0.6
    spec = PackingSpec(in_channels=4, patch_size=(1, 2, 2), max_text_len=16, layout="video3d")
    batch = pack_samples([Sample([Segment("text", data=text), Segment("video", "target", latents)])], spec)
    batch = batch.replace(timesteps=torch.where(batch.is_text, 0.0, t))
    with torch.no_grad():
        out = unpatchify_segments(model(batch), batch, (1, 2, 2))[0][-1]
    padded = torch.cat([text, text.new_zeros(16 - len(text), TEXT_DIM)])  # the pipeline pads to text_len
    inputs = {"hidden_states": latents[None], "timestep": torch.tensor([1000.0 * t]),
              "encoder_hidden_states": padded[None], "return_dict": False}  # fmt: skip
    return inputs, out


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-5, atol=1e-5)


def test_exported_adapters_load_into_diffusers_and_merge_into_its_weights(
    wan_lora_run, tmp_path: Path
) -> None:
    from diffusers import WanTransformer3DModel

    from tools.convert_checkpoint import main as tool

    folder, checkpoint, cfg = wan_lora_run
    model = imontage_with_adapters(folder, checkpoint, cfg)
    inputs, expected = one_sample(model)

    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    assert tool(["export-lora", str(checkpoint), "--out", str(lora_file), "--weights", "live"]) == 0
    adapters = load_file(lora_file)
    assert all(key.startswith("transformer.blocks.") and ".lora_" in key for key in adapters)
    assert any(".lora_B." in key and tensor.abs().max() > 0 for key, tensor in adapters.items())  # it trained
    reference = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        base = reference(**inputs)[0][0]
        reference.load_lora_adapter(str(lora_file), prefix="transformer")
        with_lora = reference(**inputs)[0][0]
    assert (with_lora - base).abs().max() > 1e-3 * base.abs().max()  # the adapters act
    close(with_lora, expected)

    merged = tmp_path / "merged"
    assert (
        tool(
            [
                "export-diffusers",
                str(checkpoint),
                "--out",
                str(merged),
                "--weights",
                "live",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    with torch.no_grad():
        close(WanTransformer3DModel.from_pretrained(merged).eval()(**inputs)[0][0], expected)


def test_adapters_beside_trained_parameters_have_no_lora_file(tmp_path: Path, wan_lora_run) -> None:
    """A run with model.lora.trainable is refused by export-lora, naming a parameter."""
    from imontage.checkpoint.lora import export_lora
    from imontage.checkpoint.tensors import ConversionError

    folder, _, _ = wan_lora_run
    from latent_shards import write_latent_shards

    overrides = [*folder_training_overrides(folder, write_latent_shards(tmp_path / "latents"), tmp_path / "run", "single"),
                 *LORA, "model.lora.trainable=[proj_out.*]", "stages=[{name: sft, objective: flow_matching, steps: 1}]"]  # fmt: skip
    run_dir = train(load_recipe(RECIPE, overrides))
    with pytest.raises(ConversionError, match="trains 'proj_out.bias' .* beside its adapters"):
        export_lora(run_dir / "checkpoints/step_000001", tmp_path / "x.safetensors", weights="live")

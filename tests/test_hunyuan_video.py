"""HunyuanVideo family: diffusers' weights load by name and give diffusers' outputs on packed batches.

Tiny random ``HunyuanVideoTransformer3DModel`` configs (fp32, CPU) are saved with
``save_pretrained`` and loaded into imontage's model strictly by name; outputs are compared with
diffusers' own forward pass on the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from safetensors.torch import load_file

from imontage.config import load_recipe
from imontage.config.schema import ModelConfig
from imontage.models import build_model, packing_spec
from imontage.models.common.sequence import PackedBatch, Sample, Segment, pack_samples, patchify
from imontage.models.hunyuan_video.diffusers_config import diffusers_config, model_config_from_diffusers
from imontage.models.hunyuan_video.model import HunyuanVideoTransformer, build_hunyuan_video

QUICKSTART = REPO / "configs/recipes/quickstart.yaml"
PATCH = (1, 2, 2)
LATENT = 4  # latent channels of the tiny models
TEXT_DIM, POOLED_DIM = 24, 12
TINY: dict[str, Any] = {
    "in_channels": LATENT,
    "out_channels": LATENT,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": TEXT_DIM,
    "pooled_projection_dim": POOLED_DIM,
    "rope_theta": 256.0,
    "rope_axes_dim": [4, 6, 6],
    "image_condition_type": None,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "t2v": {},
    "i2v_latent_concat": {"in_channels": 2 * LATENT + 1, "guidance_embeds": False, "image_condition_type": "latent_concat"},
    "i2v_token_replace": {"image_condition_type": "token_replace"},
}  # fmt: skip


def diffusers_model_class() -> Any:
    from diffusers import HunyuanVideoTransformer3DModel  # imported when used: it takes seconds

    return HunyuanVideoTransformer3DModel


def tiny_config(variant: str, layout: str = "video3d") -> Any:
    """imontage's ``model`` section of a tiny diffusers config."""
    changes = model_config_from_diffusers({**TINY, **VARIANTS[variant]})
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), changes, {"positions": {"layout": layout}})


def random_diffusers(variant: str, seed: int = 0, **changes: Any) -> Any:
    torch.manual_seed(seed)
    model = diffusers_model_class()(**{**TINY, **VARIANTS[variant], **changes})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random, so that no path is silently zero
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def imported(reference: Any, folder: Path) -> HunyuanVideoTransformer:
    """``reference`` saved as a diffusers folder, loaded into imontage's model by name (strict)."""
    reference.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_config_from_diffusers(config))
    model = build_hunyuan_video(cfg)
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model.eval()


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` of the reference's largest magnitude."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale, f"max error {error:.3g} over max magnitude {scale:.3g}"


class Case:
    """One sample's inputs, fed to diffusers unpacked and to imontage packed."""

    def __init__(self, variant: str, g: torch.Generator, frames: int, height: int, width: int,
                 text_len: int, t: float, guidance: float) -> None:  # fmt: skip
        self.variant, self.t, self.guidance = variant, t, guidance
        self.latents = torch.randn(LATENT, frames, height, width, generator=g)
        self.text = torch.randn(text_len, TEXT_DIM, generator=g)
        self.pooled = torch.randn(POOLED_DIM, generator=g)
        self.image = torch.randn(LATENT, 1, height, width, generator=g)  # the I2V condition latent
        if variant == "i2v_token_replace":  # diffusers replaces the first frame by the clean image
            self.latents[:, :1] = self.image

    def channel_condition(self) -> torch.Tensor:
        """latent_concat: the image latent on frame 0 (zeros after) and the first-frame mask."""
        image = torch.zeros_like(self.latents)
        image[:, :1] = self.image
        mask = torch.zeros(1, *self.latents.shape[1:])
        mask[:, :1] = 1
        return torch.cat([image, mask])

    def diffusers_output(self, reference: Any, text_pad: int = 0) -> torch.Tensor:
        """diffusers' velocity ``[T'·H'·W', C·pt·ph·pw]``; the text padded by ``text_pad`` masked rows."""
        hidden = self.latents
        if self.variant == "i2v_latent_concat":
            hidden = torch.cat([hidden, self.channel_condition()])
        text = torch.cat([self.text, 100 * torch.randn(text_pad, TEXT_DIM)])  # padding must not matter
        mask = torch.cat([torch.ones(len(self.text)), torch.zeros(text_pad)])
        with torch.no_grad():
            out = reference(
                hidden_states=hidden[None],
                timestep=torch.tensor([1000.0 * self.t]),
                encoder_hidden_states=text[None],
                encoder_attention_mask=mask[None],
                pooled_projections=self.pooled[None],
                guidance=torch.tensor([1000.0 * self.guidance]) if reference.config.guidance_embeds else None,
                return_dict=False,
            )[0]
        return patchify(out[0], PATCH)

    def sample(self) -> Sample:
        condition = self.channel_condition() if self.variant == "i2v_latent_concat" else None
        video = Segment("video", "target", self.latents, channel_condition=condition)
        return Sample(
            [Segment("text", data=self.text), video], pooled_text=self.pooled, guidance=self.guidance
        )


def packed(cases: list[Case], layout: str = "video3d") -> PackedBatch:
    """The cases packed, each token at its sample's timestep (token_replace: first frame at 0)."""
    spec = packing_spec(tiny_config(cases[0].variant, layout))
    batch = pack_samples([case.sample() for case in cases], spec)
    t = torch.tensor([case.t for case in cases])[batch.sample_index()]
    t = torch.where(batch.target_mask, t, torch.zeros_like(t))
    for span in batch.spans:
        if cases[span.sample].variant == "i2v_token_replace" and span.kind != "text":
            first_frame = span.length // span.shape[1]  # T' = T with pt = 1
            t[span.start : span.start + first_frame] = 0.0
    return batch.replace(timesteps=t)


def visual_rows(out: torch.Tensor, batch: PackedBatch, sample: int) -> torch.Tensor:
    (span,) = [s for s in batch.spans if s.sample == sample and s.kind != "text"]
    return out[span.start : span.start + span.length]


# T2V (guidance) and I2V latent_concat, as the presets, are in test_family_conformance.py.
@pytest.mark.parametrize("variant", ["i2v_token_replace"])
def test_single_sample_equals_diffusers(variant: str, tmp_path: Path) -> None:
    reference = random_diffusers(variant)
    model = imported(reference, tmp_path)
    case = Case(variant, torch.Generator().manual_seed(1), frames=3, height=4, width=6, text_len=5, t=0.7,
                guidance=6.0)  # fmt: skip
    batch = packed([case])
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (batch.tokens.shape[0], LATENT * 4)
    assert bool((out[batch.is_text] == 0).all())
    # diffusers with its text padded (the mask hides 3 rows) and imontage with the valid rows only.
    close(visual_rows(out, batch, 0), case.diffusers_output(reference, text_pad=3))
    close(visual_rows(out, batch, 0), case.diffusers_output(reference, text_pad=0))


@pytest.mark.parametrize("variant", ["i2v_token_replace"])
def test_packed_samples_each_equal_their_own_diffusers_run(variant: str, tmp_path: Path) -> None:
    reference = random_diffusers(variant, seed=2)
    model = imported(reference, tmp_path)
    g = torch.Generator().manual_seed(3)
    cases = [
        Case(variant, g, frames=2, height=4, width=4, text_len=3, t=0.3, guidance=4.0),
        Case(variant, g, frames=3, height=6, width=4, text_len=7, t=0.9, guidance=6.0),
        # An image (one frame); token_replace needs a frame after the replaced one.
        Case(variant, g, frames=1 + (variant == "i2v_token_replace"), height=2, width=8, text_len=1, t=0.5,
             guidance=1.0),
    ]  # fmt: skip
    batch = packed(cases)
    with torch.no_grad():
        out = model(batch)
    for index, case in enumerate(cases):
        close(visual_rows(out, batch, index), case.diffusers_output(reference, text_pad=8 - len(case.text)))


def test_token_replace_first_frame_takes_the_timestep_zero_modulation(tmp_path: Path) -> None:
    """Without the first frame at timestep 0 the output differs: the per-token path is what matches."""
    reference = random_diffusers("i2v_token_replace", seed=4)
    model = imported(reference, tmp_path)
    case = Case("i2v_token_replace", torch.Generator().manual_seed(5), 3, 4, 4, 4, t=0.6, guidance=6.0)
    batch = packed([case])
    uniform = batch.replace(timesteps=torch.where(batch.target_mask, 0.6, 0.0))
    expected = case.diffusers_output(reference)
    with torch.no_grad():
        close(visual_rows(model(batch), batch, 0), expected)
        wrong = visual_rows(model(uniform), batch, 0)
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def montage_case(g: torch.Generator, n_in: int, n_out: int) -> tuple[Sample, list[tuple[int, int]]]:
    sizes = [(2 * (1 + k % 3), 2 * (1 + (k * 2) % 5)) for k in range(n_in + n_out)]  # (H, W) per image
    segments = [Segment("text", data=torch.randn(4, TEXT_DIM, generator=g))]  # 4 text rows
    for k, (h, w) in enumerate(sizes):
        role = "condition" if k < n_in else "target"
        segments.append(Segment("image", role, torch.randn(LATENT, 1, h, w, generator=g)))
    return Sample(segments, pooled_text=torch.randn(POOLED_DIM, generator=g)), sizes


def test_montage_positions_reach_the_rope(tmp_path: Path) -> None:
    """iMontage: 5 inputs and 6 outputs at their virtual frames, each on its own (h, w) grid.

    The model equals a diffusers run over the same tokens whose RoPE is given those positions, and
    rotating with the video3d positions instead changes the output.
    """
    # No guidance embedding, so that every token (the conditions too) has diffusers' one modulation.
    reference = random_diffusers("t2v", seed=6, guidance_embeds=False)
    model = imported(reference, tmp_path)
    n_in, n_out = 5, 6
    sample, sizes = montage_case(torch.Generator().manual_seed(7), n_in, n_out)
    batch = pack_samples([sample], packing_spec(tiny_config("t2v", "montage")))
    t = 0.4
    batch = batch.replace(timesteps=torch.where(batch.is_text, 0.0, t))  # diffusers has one timestep

    frames_in = torch.linspace(0, 7, n_in).floor().long().tolist()
    frames_out = torch.linspace(24, 31, n_out).floor().long().tolist()
    visual = [s for s in batch.spans if s.kind != "text"]
    for k, (span, (h, w)) in enumerate(zip(visual, sizes, strict=True)):
        pos = batch.positions[span.start : span.start + span.length]
        assert bool((pos[:, 1] == (frames_in + frames_out)[k]).all()), k
        assert pos[:, 2].max() == h // 2 - 1 and pos[:, 3].max() == w // 2 - 1 and len(pos) == h * w // 4
        assert bool((pos[:, 0] == 0).all())
    assert bool((batch.positions[batch.is_text] == 0).all())

    with torch.no_grad():
        out = model(batch)
        # diffusers over the same tokens laid in one row of patches, its RoPE fed the montage positions.
        rows = batch.tokens[~batch.is_text]
        n = rows.shape[0]
        hidden = rows.reshape(n, LATENT, 1, 2, 2).permute(1, 2, 3, 0, 4).reshape(1, LATENT, 1, 2, 2 * n)
        positions = batch.positions[~batch.is_text]
        reference.rope.forward = lambda _: diffusers_rope(positions, [4, 6, 6], 256.0)
        assert batch.text_embeds is not None and batch.pooled_text is not None
        text = batch.text_embeds[batch.is_text]
        expected = reference(
            hidden_states=hidden,
            timestep=torch.tensor([1000.0 * t]),
            encoder_hidden_states=text[None],
            encoder_attention_mask=torch.ones(1, len(text)),
            pooled_projections=batch.pooled_text,
            return_dict=False,
        )[0]
        expected = expected[0].reshape(LATENT, 1, 2, n, 2).permute(3, 0, 1, 2, 4).reshape(n, -1)
        close(out[~batch.is_text], expected)
        video3d = pack_samples([sample], packing_spec(tiny_config("t2v"))).positions
        wrong = model(batch.replace(positions=video3d))[~batch.is_text]
        # As trained: clean conditions at timestep 0, the targets noised.
        trained = model(batch.replace(timesteps=torch.where(batch.target_mask, t, 0.0)))
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()
    assert trained.shape == out.shape and bool(trained.isfinite().all())


def diffusers_rope(
    positions: torch.Tensor, axes_dim: list[int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' HunyuanVideo RoPE tables for arbitrary (t, h, w) positions ``[N, 4]``."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    tables = [get_1d_rotary_pos_embed(d, positions[:, 1 + a].float(), theta, use_real=True)  # type: ignore[arg-type]
              for a, d in enumerate(axes_dim)]  # fmt: skip
    return torch.cat([c for c, _ in tables], dim=1), torch.cat([s for _, s in tables], dim=1)


def test_diffusers_config_round_trips() -> None:
    for variant in VARIANTS:
        config = {"_class_name": "HunyuanVideoTransformer3DModel", **TINY, **VARIANTS[variant]}
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_config_from_diffusers(config))
        assert diffusers_config(model_cfg) == config
        assert model_config_from_diffusers(
            {**config, "_diffusers_version": "0.42.1"}
        ) == model_config_from_diffusers(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [("attention_type", "x"), ("qk_norm", "layer_norm"), ("image_condition_type", "ref"),
     ("rope_axes_dim", [4, 6, 4]), ("_class_name", "WanTransformer3DModel")],
)  # fmt: skip
def test_diffusers_config_refuses_what_it_cannot_represent(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        model_config_from_diffusers({**TINY, key: value})


def test_every_parameter_learns_and_checkpointing_gives_the_same_gradients() -> None:
    cfg = load_recipe(QUICKSTART, ["model=hunyuan_video_tiny", "model.prediction=velocity"]).model
    g = torch.Generator().manual_seed(8)
    cases = [Case("t2v", g, 2, 4, 4, 3, t=0.3, guidance=4.0), Case("t2v", g, 1, 4, 6, 5, t=0.8, guidance=6.0)]
    batch = packed(cases, layout=str(cfg.positions.layout))
    grads = []
    for checkpointing in (False, True):
        model = build_model(cfg)
        assert isinstance(model, HunyuanVideoTransformer)
        torch.manual_seed(9)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        model.train()
        model.gradient_checkpointing = checkpointing
        model(batch)[batch.target_mask].square().mean().backward()
        named = dict(model.named_parameters())
        lifeless = [name for name, p in named.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert not lifeless, lifeless
        grads.append(torch.cat([p.grad.flatten() for p in named.values() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_samples_without_text_run() -> None:
    """Text dropout removes a sample's text rows; a batch may have none at all."""
    model = build_model(tiny_config("t2v"))
    spec = packing_spec(tiny_config("t2v"))
    case = Case("t2v", torch.Generator().manual_seed(10), 2, 4, 4, 3, t=0.5, guidance=5.0)
    silent = case.sample()
    silent.segments = silent.segments[1:]  # the video alone
    with torch.no_grad():
        outputs = []
        for samples in ([silent, case.sample()], [silent]):
            batch = pack_samples(samples, spec)
            outputs.append(model(batch.replace(timesteps=torch.where(batch.target_mask, 0.5, 0.0))))
    n = outputs[1].shape[0]
    assert n == 8 and bool(outputs[0].isfinite().all())
    close(outputs[0][:n], outputs[1])

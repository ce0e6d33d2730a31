"""Training-step benchmark of the newest families against diffusers' own models, on the same batch.

    pytest tests/benchmarks/test_family_step_bench.py -m benchmark -s [--bench-size small|full]
        [--bench-shapes ti2v_5b,a14b_expert,hunyuan_video_15] [--bench-repeats 3] [--bench-csv runs/bench]

One case per family issue 20 adds: Wan 2.2 TI2V-5B (48 latent channels; per-token timesteps, the
first latent frame clean, as ``WanPipeline`` runs it under ``expand_timesteps``), one expert of Wan 2.2
A14B (``model.expert=transformer``: what a step of either A14B mode runs) and HunyuanVideo 1.5 I2V
(Qwen2.5-VL text, ByT5 glyph text, SigLIP image tokens and the first-frame channel condition).
Each pair is built from one config, diffusers' model with its default random init and imontage's
loaded from its ``state_dict()`` by name (strict); a step is forward and backward of the mean square
of the output over the video rows, no optimiser; the two alternate over the repeats after warm-up
(:func:`~tests.benchmarks.test_wan_step_bench.alternate_steps`), ``ratio`` = imontage / diffusers
in median wall time (below 1: imontage is faster), ``cpu_ratio`` the same in process CPU time on CPU.
Wan's text is zero-padded to ``text_len`` for both, as its pipeline pads it (imontage's Wan pads too);
HunyuanVideo 1.5's text reaches diffusers unpadded (its pipeline pads to 1000 + 256 rows and masks
them: padding would only slow it).

Sizes (one sample; the video tokens are the case's):

- ``small`` (the default on CPU): the tiny presets in fp32 at 512 video tokens, one thread: checks the
  harness and that both models agree, not any speed.
- ``full`` on CPU: each family's layers cut to width 512 (4 heads × 128), 4 blocks, FFN 2048, fp32,
  one thread, at 2,048 video tokens: matrix products dominate, as in the Wan 2.1 CPU case.
- ``full`` on CUDA: bf16, the presets' widths at 16,384 video tokens with activation checkpointing on
  both, blocks cut (TI2V-5B 10 of 30, the A14B expert 10 of 40, HunyuanVideo 1.5 18 of 54) so that
  both models, their gradients and the fp32 build fit one 80 GB card and a few minutes: the step's
  ratio is the blocks'.

Nothing here asserts on time: only that both models give the same output and the figures are finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from imontage.checkpoint.diffusers import build_diffusers_model
from imontage.models import build_model, packing_spec
from imontage.models.common import Sample, Segment, pack_samples, unpatchify_segments

from .test_wan_step_bench import (
    alternate_steps,
    bench_device,
    model_config,
    model_pair,
    relative_difference,
    report_rows,
    run_cases,
    select_cases,
)

pytestmark = pytest.mark.benchmark

# Width 512 (4 heads x 128), 4 blocks, FFN 2048: the CPU size of docs/performance.md's Wan 2.1 case.
CPU_512 = (("hidden_size", 512), ("num_heads", 4), ("depth", 4), ("mlp_hidden_size", 2048))


@dataclass(frozen=True)
class Case:
    name: str  # the family's case: ti2v_5b, a14b_expert, hunyuan_video_15
    model: str  # configs/model preset
    frames: int  # latent frames
    latent_hw: int  # latent height = width
    text_tokens: int
    overrides: tuple[tuple[str, Any], ...] = ()  # model config fields changed from the preset's
    checkpointing: bool = False

    @property
    def label(self) -> str:
        return " ".join([self.model, *(f"{key}={value}" for key, value in self.overrides)])


A14B_EXPERT = (("expert", "transformer"),)
SMALL = [
    Case("ti2v_5b", "wan_tiny", 2, 32, 8, (("wan.expand_timesteps", True),)),
    Case("a14b_expert", "wan_tiny", 2, 32, 8, (("wan.boundary_ratio", 0.875), *A14B_EXPERT)),
    Case("hunyuan_video_15", "hunyuan_video_1.5_tiny", 2, 16, 8),
]
CPU_FULL = [
    Case("ti2v_5b", "wan2.2_ti2v_5b", 2, 64, 64, CPU_512),
    Case("a14b_expert", "wan2.2_t2v_a14b", 2, 64, 64, (*CPU_512, *A14B_EXPERT)),
    Case("hunyuan_video_15", "hunyuan_video_1.5_i2v", 2, 32, 64, CPU_512),
]
FULL = [
    Case("ti2v_5b", "wan2.2_ti2v_5b", 16, 64, 64, (("depth", 10),), checkpointing=True),
    Case("a14b_expert", "wan2.2_t2v_a14b", 16, 64, 64, (("depth", 10), *A14B_EXPERT), checkpointing=True),
    Case("hunyuan_video_15", "hunyuan_video_1.5_i2v", 16, 32, 64, (("depth", 18),), checkpointing=True),
]


@dataclass
class Pair:
    """Both models' steps on one batch, and what the table reports of it."""

    step: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]
    video_tokens: int
    text_tokens: int  # the rows diffusers' text attention reads (Wan: padded; HunyuanVideo 1.5: all of its text stream)


def training_steps(
    model: Any, reference: Any, batch: Any, diffusers_inputs: dict[str, Any]
) -> dict[str, Callable]:
    """One forward + backward per model; each returns its target video ``[C, T, H, W]`` and its loss."""
    target, segment = ~batch.is_text, len(batch.spans) - 1  # one sample: its video is its last segment
    video = next(i for i, span in enumerate(batch.spans) if span.kind != "text")

    def imontage_step() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(batch)  # [N, C·pt·ph·pw]; text rows are zero
        loss = out[target].float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return unpatchify_segments(out.detach(), batch, model.patch_size)[0][video], loss.detach()

    def diffusers_step() -> tuple[torch.Tensor, torch.Tensor]:
        out = reference(**diffusers_inputs, return_dict=False)[0]  # [1, C, T, H, W]
        loss = out.float().square().mean()
        loss.backward()
        reference.zero_grad(set_to_none=True)
        return out.detach()[0], loss.detach()

    assert segment == video, batch.spans
    return {"imontage": imontage_step, "diffusers": diffusers_step}


def wan_pair(
    cfg: Any, case: Case, model: Any, reference: Any, device: torch.device, dtype: torch.dtype
) -> Pair:
    """One clip and its text; TI2V (``expand_timesteps``): the first latent frame's tokens at t = 0,
    the others at t, per token for both (the pipeline's ``first_frame_mask[:, ::2, ::2] * t``)."""
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(cfg.in_channels, case.frames, case.latent_hw, case.latent_hw, generator=g)
    text = torch.randn(case.text_tokens, cfg.text_dim, generator=g)
    batch = pack_samples(
        [Sample([Segment("text", data=text), Segment("video", "target", clip)])], packing_spec(cfg)
    )
    t = torch.full((int((~batch.is_text).sum()),), 0.5)  # [video tokens]
    if bool(cfg.wan.expand_timesteps):
        pt, ph, pw = cfg.patch_size
        t[: (case.latent_hw // ph) * (case.latent_hw // pw)] = 0.0  # latent frame 0, clean
    timesteps = torch.zeros(batch.tokens.shape[0])
    timesteps[~batch.is_text] = t
    batch = batch.replace(timesteps=timesteps).to(device)
    padded = torch.cat([text, text.new_zeros(int(cfg.wan.text_len) - case.text_tokens, cfg.text_dim)])
    per_token = bool(cfg.wan.expand_timesteps)
    inputs = {
        "hidden_states": clip[None].to(device, dtype),  # [1, C, T, H, W]
        "timestep": (1000.0 * (t[None] if per_token else t[:1])).to(device),  # [1, seq] or [1]
        "encoder_hidden_states": padded[None].to(device, dtype),  # [1, text_len, E]
    }
    return Pair(training_steps(model, reference, batch, inputs), len(t), int(cfg.wan.text_len))


def hunyuan_video_15_pair(
    cfg: Any, case: Case, model: Any, reference: Any, device: torch.device, dtype: torch.dtype
) -> Pair:
    """One I2V clip: Qwen text, 8 rows of glyph text, 729 SigLIP tokens and the channel condition (the
    condition image's latent on frame 0, then the first-frame mask), as the I2V pipeline feeds them."""
    from imontage.models.hunyuan_video_15.cost import SIGLIP_IMAGE_TOKENS

    hv, g = cfg.hunyuan_video_15, torch.Generator().manual_seed(0)
    latent = int(hv.out_channels)
    clip = torch.randn(latent, case.frames, case.latent_hw, case.latent_hw, generator=g)
    condition = torch.zeros(latent + 1, *clip.shape[1:])
    condition[:latent, :1] = torch.randn(latent, 1, case.latent_hw, case.latent_hw, generator=g)
    condition[latent, :1] = 1
    text = torch.randn(case.text_tokens, cfg.text_dim, generator=g)
    glyph = torch.randn(8, int(hv.text_embed_2_dim), generator=g)
    image = torch.randn(SIGLIP_IMAGE_TOKENS, int(hv.image_embed_dim), generator=g)
    segments = [Segment("text", data=text), Segment("text", data=glyph, encoder=1),
                Segment("video", "target", clip, channel_condition=condition)]  # fmt: skip
    batch = pack_samples([Sample(segments, image_embeds=image)], packing_spec(cfg))
    batch = batch.replace(timesteps=torch.where(batch.target_mask, 0.5, 0.0)).to(device)
    inputs = {
        "hidden_states": torch.cat([clip, condition])[None].to(device, dtype),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": text[None].to(device, dtype),
        "encoder_attention_mask": torch.ones(1, len(text), device=device),
        "encoder_hidden_states_2": glyph[None].to(device, dtype),
        "encoder_attention_mask_2": torch.ones(1, len(glyph), device=device),
        "image_embeds": image[None].to(device, dtype),
    }
    video = case.frames * case.latent_hw**2
    return Pair(training_steps(model, reference, batch, inputs), video, len(text) + len(glyph) + len(image))


PAIRS = {"wan": wan_pair, "hunyuan_video_15": hunyuan_video_15_pair}


def time_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int = 2) -> dict:
    cfg = model_config(case.model, case.overrides)
    reference, model = model_pair(cfg, case, device, dtype, build_diffusers_model, build_model)
    pair = PAIRS[str(cfg.family)](cfg, case, model, reference, device, dtype)
    timed = alternate_steps(pair.step, device, repeats, warmup)
    (ours, our_loss), (theirs, their_loss) = timed.results["imontage"], timed.results["diffusers"]
    seconds, cpu_seconds, on_cpu = timed.seconds, timed.cpu_seconds, device.type == "cpu"
    return {
        "case": case.name, "model": case.label, "params": sum(p.numel() for p in model.parameters()),
        "video_tokens": pair.video_tokens, "text_tokens": pair.text_tokens,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "checkpointing": case.checkpointing,
        "imontage_s": round(seconds["imontage"], 4), "diffusers_s": round(seconds["diffusers"], 4),
        "ratio": round(seconds["imontage"] / seconds["diffusers"], 3), "repeats": repeats,
        "threads": torch.get_num_threads() if on_cpu else "",
        "imontage_cpu_s": round(cpu_seconds["imontage"], 4) if on_cpu else "",
        "diffusers_cpu_s": round(cpu_seconds["diffusers"], 4) if on_cpu else "",
        "cpu_ratio": round(cpu_seconds["imontage"] / cpu_seconds["diffusers"], 3) if on_cpu else "",
        "imontage_gib": timed.peak_gib["imontage"], "diffusers_gib": timed.peak_gib["diffusers"],
        "out_rel_diff": float(f"{relative_difference(ours, theirs):.3g}"),
        "loss_rel_diff": float(f"{abs(float(our_loss) / float(their_loss) - 1):.3g}"),
    }  # fmt: skip


def test_family_steps_against_diffusers(bench_options: dict, request: pytest.FixtureRequest) -> None:
    device = bench_device(request)
    full = bench_options["size"] == "full"
    cases = select_cases(bench_options, device, FULL, CPU_FULL, SMALL)
    repeats = bench_options["repeats"] or (5 if full and device.type == "cuda" else 3)
    rows = run_cases(cases, device, repeats, time_case)
    report_rows(
        rows,
        Path(bench_options["csv_dir"]) / "family_step.csv",
        device,
        ("imontage_s", "diffusers_s", "ratio"),
    )

"""Euler integration of the flow ODE from noise (t = 1) to data (t = 0), with classifier-free guidance.

The unconditional pass of classifier-free guidance (``guidance != 1``) is one of two, chosen by the
caller:

- no ``negative``: each sample without its text tokens, every other input kept (a HunyuanVideo
  sample's pooled text too): the unconditional ``flow_matching.text_dropout`` trains, which drops
  the text tokens only.
- a :class:`Negative`: each sample's text replaced by the negative prompt's embeddings and its pooled
  text by the negative's, every other input kept (the distilled guidance, the channel condition,
  image tokens): diffusers' HunyuanVideo pipelines' true CFG (``true_cfg_scale > 1`` with a
  ``negative_prompt``, run through both text encoders; the same ``guidance`` goes to both passes).

HunyuanVideo-I2V ``token_replace`` (``clean_first_frame``): the first latent frame of every target
of more than one frame is the target's given frame, clean at timestep 0 through every step, and
comes out unchanged (``HunyuanVideoImageToVideoPipeline``: ``cat([image_latents, latents[:, :, 1:]])``,
the scheduler stepping frames 1.. only), as training keeps it clean.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from imontage.models.common.sequence import (
    PackedBatch,
    PackingSpec,
    Sample,
    Segment,
    pack_samples,
    unpatchify_segments,
)
from imontage.objectives.flow_matching import first_frame_mask, select_tokens, shift_timesteps


def sampling_timesteps(steps: int, shift: float) -> list[float]:
    """``steps + 1`` decreasing times from 1 to 0, shifted like training's t."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()


@dataclass
class Negative:
    """A negative prompt's precomputed text: ``text`` ``[L, E]`` and, for a model that reads one,
    ``pooled_text`` ``[E]`` (``tools/encode_shards.py --negative-prompt`` writes them)."""

    text: torch.Tensor
    pooled_text: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Negative:
        """From a safetensors file with tensors ``text_embedding`` (and ``pooled_text``)."""
        from safetensors.torch import load_file

        tensors = load_file(os.fspath(path))
        if "text_embedding" not in tensors or tensors["text_embedding"].dim() != 2:
            raise ValueError(f"{path}: no 'text_embedding' tensor [L, E] (a negative prompt's text)")
        pooled = tensors.get("pooled_text")
        if pooled is not None and pooled.dim() != 1:
            raise ValueError(f"{path}: 'pooled_text' has shape {tuple(pooled.shape)}, expected [E]")
        return cls(tensors["text_embedding"].float(), None if pooled is None else pooled.float())

    def apply(self, sample: Sample) -> Sample:
        """``sample`` with its text segments replaced by the negative's text (where its first text
        segment was; first without one) and its pooled text by the negative's."""
        if any(s.kind == "text" and s.data is None for s in sample.segments):
            raise ValueError(
                f"sample {sample.key}: its text is a string; a negative prompt replaces precomputed text"
            )
        if sample.pooled_text is not None and self.pooled_text is None:
            raise ValueError(
                f"sample {sample.key}: the model reads pooled text and the negative prompt has none "
                "(encode it with --pooled-text-encoder)"
            )
        at = next((i for i, s in enumerate(sample.segments) if s.kind == "text"), 0)
        visual = [s for s in sample.segments if s.kind != "text"]
        segments = [*visual[:at], Segment("text", data=self.text), *visual[at:]]
        pooled = None if sample.pooled_text is None else self.pooled_text
        return replace(sample, segments=segments, pooled_text=pooled)


def unconditional_batch(
    samples: Sequence[Sample], batch: PackedBatch, spec: PackingSpec, negative: Negative | None
) -> PackedBatch:
    """The batch of the unconditional pass (see the module docstring): its visual rows are
    ``batch``'s, in the same order."""
    if negative is None:
        return select_tokens(batch, ~batch.is_text)
    return pack_samples([negative.apply(sample) for sample in samples], spec)


@torch.no_grad()
def sample_flow(
    model: nn.Module,
    samples: Sequence[Sample],
    spec: PackingSpec,
    steps: int = 20,
    guidance: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    *,
    negative: Negative | None = None,
    clean_first_frame: bool = False,
) -> list[list[torch.Tensor | None]]:
    """Generate every target segment of ``samples`` given their conditions and text.

    Target segments need ``data`` only for their shape (with ``clean_first_frame``, a target
    video's first frame is taken from it). Returns, per sample and per segment, ``[C, T, H, W]`` in
    model space: the generated targets, and the conditions as given (None for text).
    ``negative``, ``clean_first_frame``: see the module docstring.
    """
    batch = pack_samples(samples, spec).to(device)
    clean = first_frame_mask(batch) if clean_first_frame else torch.zeros_like(batch.target_mask)
    noised = batch.target_mask & ~clean  # [N] the rows the ODE moves
    x = torch.randn(batch.tokens.shape, generator=generator).to(device)
    unconditional = (
        unconditional_batch(samples, batch, spec, negative).to(device) if guidance != 1.0 else None
    )
    visual = ~batch.is_text
    times = sampling_timesteps(steps, shift)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        tokens = torch.where(noised[:, None], x, batch.tokens)
        timesteps = torch.where(noised, torch.full_like(batch.timesteps, t), 0.0)
        velocity = model(batch.replace(tokens=tokens, timesteps=timesteps)).float()  # [N, P]
        if unconditional is not None:
            free_visual = ~unconditional.is_text
            free_tokens, free_t = unconditional.tokens.clone(), unconditional.timesteps.clone()
            free_tokens[free_visual], free_t[free_visual] = tokens[visual], timesteps[visual]
            free = model(unconditional.replace(tokens=free_tokens, timesteps=free_t)).float()[free_visual]
            velocity[visual] = free + guidance * (velocity[visual] - free)
        x = x + (t_next - t) * velocity
    return unpatchify_segments(torch.where(noised[:, None], x, batch.tokens).cpu(), batch, spec.patch_size)

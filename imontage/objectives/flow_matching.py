"""Rectified-flow matching, the SFT objective.

For clean target tokens x0 and noise ε: x_t = (1 − t)·x0 + t·ε, and the model regresses the
velocity ε − x0. t is drawn per sample from a logit-normal distribution, optionally shifted
towards noisier values; condition and text tokens stay clean with t = 0. The loss is the mean
squared error over target tokens only.

HunyuanVideo-I2V with ``image_condition_type: token_replace`` replaces a video's first latent frame
by the clean condition image (diffusers' ``HunyuanVideoImageToVideoPipeline``: ``cat([image_latents,
latents[:, :, 1:]], dim=2)``, the scheduler stepping frames 1.. only). Training keeps the first latent
frame of every target video (a target of more than one frame) clean: timestep 0, not noised, not in
the loss; the model modulates such target tokens as clean conditions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
from torch import nn, special

from imontage.models import trained_experts
from imontage.models.common.sequence import PackedBatch
from imontage.models.registry import family


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift·t / (1 + (shift − 1)·t)``: the identity for shift = 1, noisier for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


FULL_RANGE = (0.0, 1.0)


def _normal_at(t: float, mean: float, std: float, shift: float) -> float:
    """The standard normal value that :func:`sample_timesteps` maps to ``t`` (the inverse of the map)."""
    if t <= 0.0 or t >= 1.0:
        return -math.inf if t <= 0.0 else math.inf
    unshifted = t / (shift - (shift - 1) * t)
    return (math.log(unshifted / (1 - unshifted)) - mean) / std


def _cdf_bounds(t_range: tuple[float, float], mean: float, std: float, shift: float) -> tuple[float, float]:
    """The standard normal's CDF at the values that map to ``t_range``'s bounds."""
    low, high = (float(special.ndtr(torch.tensor(_normal_at(t, mean, std, shift), dtype=torch.float64)))
                 for t in t_range)  # fmt: skip
    return low, high


def sample_timesteps(
    num: int,
    mean: float,
    std: float,
    shift: float,
    generator: torch.Generator | None = None,
    t_range: tuple[float, float] = FULL_RANGE,
) -> torch.Tensor:
    """``[num]`` logit-normal t in (0, 1), shifted; within ``t_range`` = ``[low, high)``, the same
    distribution restricted to it (one expert's timesteps): the normal is drawn truncated, by
    inverting its CDF on the range's share, so every t is in range and no draw is rejected."""
    if tuple(t_range) == FULL_RANGE:
        normal = torch.randn(num, generator=generator) * std + mean
        return shift_timesteps(torch.sigmoid(normal), shift)
    low, high = _cdf_bounds(t_range, mean, std, shift)
    u = low + (high - low) * torch.rand(num, generator=generator, dtype=torch.float64)
    t = shift_timesteps(torch.sigmoid(special.ndtri(u) * std + mean), shift)
    # Rounding may land on a bound: keep t inside [low, high), off 0 (no noise, no target).
    top = math.nextafter(t_range[1], 0.0) if t_range[1] < 1.0 else 1.0
    return t.clamp(min=max(t_range[0], 1e-6), max=top).float()


def expert_range(model_cfg: Any) -> tuple[float, float]:
    """The timesteps the model of ``model_cfg`` is trained on: the range of the one expert it
    builds (``model.expert``), all of them for a model of one network or of every expert."""
    experts = trained_experts(model_cfg) if model_cfg is not None else ()
    return (experts[0].t_min, experts[0].t_max) if len(experts) == 1 else FULL_RANGE


def expert_ranges(model_cfg: Any) -> tuple[tuple[float, float], ...]:
    """The ranges of t a step of ``model_cfg``'s run picks one of: every expert's when it trains
    them all in one run (highest first), else its one range."""
    experts = trained_experts(model_cfg) if model_cfg is not None else ()
    return tuple((e.t_min, e.t_max) for e in experts) if len(experts) > 1 else (expert_range(model_cfg),)


def range_share(t_range: tuple[float, float], mean: float, std: float, shift: float) -> float:
    """The probability that :func:`sample_timesteps` draws a t in ``t_range`` over the full range."""
    low, high = _cdf_bounds(t_range, mean, std, shift)
    return high - low


STEP_SEED_STRIDE = 2**32  # a step's expert draw is seeded by seed × stride + step


def step_range(
    ranges: tuple[tuple[float, float], ...], mean: float, std: float, shift: float, seed: int, step: int
) -> tuple[float, float]:
    """The range of t optimiser step ``step`` draws in: one of ``ranges``, picked with the weight of
    its share of the distribution (:func:`range_share`), so that over the steps t keeps the full
    distribution. The pick depends on ``(seed, step)`` only: every rank picks the same range (so
    runs the same expert, as ZeRO-3's gathers need), and a resumed run picks as before."""
    if len(ranges) == 1:
        return ranges[0]
    weights = torch.tensor([range_share(r, mean, std, shift) for r in ranges], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed * STEP_SEED_STRIDE + step)
    return ranges[int(torch.multinomial(weights, 1, generator=generator))]


def clean_first_frame(model_cfg: Any) -> bool:
    """Whether the model keeps each target video's first latent frame clean (its family says:
    HunyuanVideo-I2V's token_replace); a ValueError names a config that cannot."""
    return family(model_cfg).clean_first_frame(model_cfg)


def first_frame_mask(batch: PackedBatch) -> torch.Tensor:
    """``[N]`` bool: the first latent frame's tokens of every target segment of more than one frame.

    Tokens are t-major within a segment, so they are its first ``H'·W'`` (temporal patch size 1).
    """
    mask = torch.zeros_like(batch.target_mask)
    for span in batch.spans:
        if span.role == "target" and span.kind != "text" and span.shape[1] > 1:
            mask[span.start : span.start + span.length // span.shape[1]] = True
    return mask


def noise_batch(
    batch: PackedBatch, t: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor | None = None
) -> tuple[PackedBatch, torch.Tensor]:
    """Noise the target tokens of ``batch`` at per-sample ``t`` ``[B]``; returns (noised batch, velocity target).

    ``clean`` ``[N]``: target tokens left clean at timestep 0 (token_replace's first frames); they stay
    targets of the batch (the model tells them by their timestep) but belong in no loss.
    """
    x0 = batch.tokens  # [N, P]
    noised = batch.target_mask if clean is None else batch.target_mask & ~clean
    t_token = t.to(x0.device)[batch.sample_index()]  # [N]
    t_token = torch.where(noised, t_token, torch.zeros_like(t_token))
    xt = torch.where(noised[:, None], (1 - t_token[:, None]) * x0 + t_token[:, None] * noise, x0)
    return batch.replace(tokens=xt, timesteps=t_token), noise - x0


def loss_mask(batch: PackedBatch, clean: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` bool: the tokens the loss counts, the targets that were noised."""
    return batch.target_mask if clean is None else batch.target_mask & ~clean


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the rows ``mask`` selects (``[N, P]`` and ``[N]``)."""
    weights = mask.to(prediction.dtype)[:, None]
    return ((prediction.float() - target.float()).pow(2) * weights).sum() / (
        weights.sum() * prediction.shape[1]
    ).clamp(min=1)


def text_keep_mask(batch: PackedBatch, drop: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: every token but the text of the samples where ``drop`` ``[B]`` is true."""
    return ~(batch.is_text & drop.to(batch.is_text.device)[batch.sample_index()])


def select_tokens(batch: PackedBatch, keep: torch.Tensor) -> PackedBatch:
    """The batch restricted to the tokens ``keep`` ``[N]`` selects, with cu_seqlens and spans to match."""
    kept_before = [0, *accumulate(keep.tolist())]  # new index of old token i
    spans = [
        dataclasses.replace(
            span,
            start=kept_before[span.start],
            length=kept_before[span.start + span.length] - kept_before[span.start],
        )
        for span in batch.spans
    ]
    return batch.replace(
        **batch.map_tokens(lambda rows: rows[keep]),
        cu_seqlens=torch.tensor([kept_before[c] for c in batch.cu_seqlens.tolist()], dtype=torch.int32).to(
            keep.device
        ),
        spans=[span for span in spans if span.length > 0],
    )


@dataclass
class FlowMatchingOutput:
    loss: torch.Tensor
    num_target_tokens: int
    # task -> (sum of squared errors, target values): per-task losses for the log, no gradient
    task_errors: dict[str, tuple[float, int]] = field(default_factory=dict)


def task_errors(
    prediction: torch.Tensor, target: torch.Tensor, batch: PackedBatch, mask: torch.Tensor | None = None
) -> dict[str, tuple[float, int]]:
    """Squared error and value count of the target tokens (or those of ``mask``) of each task of ``batch``."""
    if not batch.tasks:
        return {}
    squared = (prediction.detach().float() - target.float()).pow(2).sum(dim=1)  # [N]
    mask = batch.target_mask if mask is None else mask
    sample = batch.sample_index()[mask]
    per_sample = torch.zeros(batch.num_samples, dtype=torch.float64, device=squared.device)
    per_sample.index_add_(0, sample, squared[mask].double())
    counts = torch.bincount(sample, minlength=batch.num_samples) * prediction.shape[1]
    totals: dict[str, tuple[float, int]] = {}
    for task, error, count in zip(batch.tasks, per_sample.tolist(), counts.tolist(), strict=True):
        name = task or "untitled"
        previous = totals.get(name, (0.0, 0))
        totals[name] = (previous[0] + error, previous[1] + int(count))
    return totals


class FlowMatching:
    """The ``flow_matching`` objective of a stage."""

    def __init__(
        self,
        t_mean: float = 0.0,
        t_std: float = 1.0,
        shift: float = 1.0,
        text_dropout: float = 0.0,
        clean_first_frame: bool = False,
        t_range: tuple[float, float] = FULL_RANGE,
    ):
        self.t_mean, self.t_std, self.shift, self.text_dropout = t_mean, t_std, shift, text_dropout
        self.clean_first_frame = clean_first_frame  # token_replace: see the module docstring
        self.t_range = t_range  # one expert's timesteps (model.expert); FULL_RANGE otherwise
        self.t_ranges: tuple[tuple[float, float], ...] = (t_range,)  # every expert's, for step_range

    @classmethod
    def from_config(cls, cfg: Any, model_cfg: Any = None) -> FlowMatching:
        """From a :class:`~imontage.config.schema.FlowMatchingConfig` (dataclass or OmegaConf node)
        and the model config (``token_replace`` keeps first frames clean; ``model.expert``: its range of t)."""
        clean = model_cfg is not None and clean_first_frame(model_cfg)
        objective = cls(cfg.t_mean, cfg.t_std, cfg.shift, cfg.text_dropout, clean, expert_range(model_cfg))
        objective.t_ranges = expert_ranges(model_cfg)
        return objective

    def step_range(self, seed: int, step: int) -> tuple[float, float]:
        """The range of t of optimiser step ``step`` (:func:`step_range`): the same on every rank."""
        return step_range(self.t_ranges, self.t_mean, self.t_std, self.shift, seed, step)

    def __call__(
        self,
        model: nn.Module,
        batch: PackedBatch,
        generator: torch.Generator,
        t_range: tuple[float, float] | None = None,
    ) -> FlowMatchingOutput:
        """``t_range``: the step's range of t (:meth:`step_range`); None: the objective's own."""
        # Every draw comes from `generator` on the CPU, so a resumed run repeats it exactly.
        t_range = self.t_range if t_range is None else t_range
        t = sample_timesteps(batch.num_samples, self.t_mean, self.t_std, self.shift, generator, t_range)
        noise = torch.randn(batch.tokens.shape, generator=generator).to(batch.tokens.device)
        drop = torch.rand(batch.num_samples, generator=generator) < self.text_dropout
        clean = first_frame_mask(batch) if self.clean_first_frame else None
        noised, velocity = noise_batch(batch, t, noise, clean)
        mask = loss_mask(batch, clean)
        if bool(drop.any()):  # these samples train unconditionally, for classifier-free guidance
            keep = text_keep_mask(batch, drop)
            noised, velocity, mask = select_tokens(noised, keep), velocity[keep], mask[keep]
        prediction = model(noised)
        loss = masked_mse(prediction, velocity, mask)
        return FlowMatchingOutput(loss, int(mask.sum()), task_errors(prediction, velocity, noised, mask))

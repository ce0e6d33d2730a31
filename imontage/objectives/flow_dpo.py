"""Flow DPO: Diffusion-DPO on rectified flow, DreaMontage's preference stage.

A batch holds preference pairs back to back: ``[win, lose, win, lose, ...]`` (the data layer
decodes a sample with ``group: win|lose`` target segments into these two training samples, which
share every condition). Each pair draws ONE t and ONE noise, shared by winner and loser, so
their flow-matching errors differ only by the target. With ``e`` the mean squared velocity error
over a sample's target values, of the policy and of the frozen reference (the policy's weights
at the start of the stage):

    margin = −β/2 · [(e_w − e_w_ref) − (e_l − e_l_ref)]      (the implicit reward margin)
    loss   = −log σ(margin), averaged over the pairs

The policy gains reward on a pair when it lowers its error on the winner more than on the loser,
relative to the reference. The reference gets no gradient: its forward runs under ``no_grad``.
With policy = reference (the stage's first step) every margin is 0, the loss is log 2 and
d loss / d margin = −1/2 per pair, so the policy's gradient is β/4 · mean over pairs of
(∇e_w − ∇e_l): zero only for a pair whose winner is its loser.

β scales error differences into logits, so its useful size depends on how far training moves
them: in the thousands for the ε-MSE of SD-like latents (Diffusion-DPO's scripts use 2500-5000),
see docs/recipes.md. Text dropout does not apply here: a pair's winner and loser must see the
same condition, and DPO tunes the conditional model only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imontage.models.common.sequence import PackedBatch
from imontage.objectives.flow_matching import (
    FULL_RANGE,
    FlowMatchingOutput,
    clean_first_frame,
    expert_range,
    expert_ranges,
    first_frame_mask,
    loss_mask,
    noise_batch,
    sample_timesteps,
    step_range,
    task_errors,
)


class PairError(ValueError):
    """A batch of a DPO stage that is not made of ``[win, lose]`` preference pairs."""


def _pair_name(batch: PackedBatch, pair: int) -> str:
    task = batch.tasks[2 * pair] if batch.tasks else ""
    return f"pair {pair} (samples {2 * pair} and {2 * pair + 1}{f', task {task!r}' if task else ''})"


def check_pairs(batch: PackedBatch) -> None:
    """Raise :class:`PairError` unless samples ``2i``, ``2i + 1`` are a winner and a loser sharing conditions.

    A pair's two samples have the same segments and shapes, and equal condition and text tokens:
    only the target values differ. A batch of plain (unpaired) samples fails here.
    """
    count = batch.num_samples
    if count == 0 or count % 2:
        raise PairError(
            f"flow DPO needs preference pairs [win, lose, ...], got a batch of {count} samples: "
            "a DPO stage reads shards whose samples have 'group: win|lose' target segments"
        )
    bounds = batch.cu_seqlens.tolist()
    layouts: dict[int, list[tuple[int, str, str, tuple[int, ...]]]] = {}
    for span in batch.spans:
        layouts.setdefault(span.sample, []).append((span.index, span.kind, span.role, span.shape))
    for pair in range(count // 2):
        win, lose = 2 * pair, 2 * pair + 1
        if layouts.get(win) != layouts.get(lose):
            raise PairError(
                f"flow DPO: {_pair_name(batch, pair)} do not have the same segments and shapes "
                f"(winner {layouts.get(win)}, loser {layouts.get(lose)}); a pair's target segments must "
                "have equal shapes to share one noise"
            )
        rows_w, rows_l = slice(bounds[win], bounds[win + 1]), slice(bounds[lose], bounds[lose + 1])
        condition = ~batch.target_mask[rows_w]  # [L]
        shared = (
            torch.equal(batch.tokens[rows_w][condition], batch.tokens[rows_l][condition])
            and torch.equal(batch.text_ids[rows_w], batch.text_ids[rows_l])
            and torch.equal(batch.positions[rows_w], batch.positions[rows_l])
            and (
                batch.text_embeds is None or torch.equal(batch.text_embeds[rows_w], batch.text_embeds[rows_l])
            )
        )
        if not shared:
            raise PairError(
                f"flow DPO: {_pair_name(batch, pair)} do not share their conditions, so they are not a "
                "preference pair: a DPO stage reads shards whose samples have 'group: win|lose' targets"
            )


def noise_pairs(
    batch: PackedBatch,
    t_mean: float,
    t_std: float,
    shift: float,
    generator: torch.Generator,
    clean: torch.Tensor | None = None,
    t_range: tuple[float, float] = FULL_RANGE,
) -> tuple[PackedBatch, torch.Tensor]:
    """The batch noised with one t and one noise per pair; returns (noised batch, velocity target).
    ``clean``: target tokens kept clean (token_replace's first frames, see flow_matching);
    ``t_range``: one expert's timesteps (flow_matching's ``expert_range``).

    Draws, in order, from ``generator`` on the CPU: t ``[pairs]``, then each pair's noise ``[L, P]``.
    """
    pairs = batch.num_samples // 2
    t = sample_timesteps(pairs, t_mean, t_std, shift, generator, t_range).repeat_interleave(2)  # [B]
    bounds = batch.cu_seqlens.tolist()
    width = batch.tokens.shape[1]
    noise = []
    for pair in range(pairs):
        shared = torch.randn((bounds[2 * pair + 1] - bounds[2 * pair], width), generator=generator)
        noise += [shared, shared]
    return noise_batch(batch, t, torch.cat(noise).to(batch.tokens.device), clean)


def sample_errors(
    prediction: torch.Tensor, target: torch.Tensor, batch: PackedBatch, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B]`` mean squared error over each sample's target values (or those of ``mask`` ``[N]``;
    ``prediction``, ``target``: ``[N, P]``)."""
    squared = (prediction.float() - target.float()).pow(2).sum(dim=1)  # [N]
    mask = batch.target_mask if mask is None else mask
    sample = batch.sample_index()[mask]
    totals = torch.zeros(batch.num_samples, device=squared.device).index_add(0, sample, squared[mask])
    counts = torch.bincount(sample, minlength=batch.num_samples) * prediction.shape[1]
    return totals / counts.clamp(min=1)


def dpo_loss(
    policy_win: torch.Tensor,
    policy_lose: torch.Tensor,
    reference_win: torch.Tensor,
    reference_lose: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss averaged over pairs, ``[pairs]`` implicit reward margins) from ``[pairs]`` errors."""
    margin = -beta / 2 * ((policy_win - reference_win) - (policy_lose - reference_lose))
    return -F.logsigmoid(margin).mean(), margin


@dataclass
class FlowDPOOutput(FlowMatchingOutput):
    # name -> value of this micro-batch, averaged by the trainer and logged next to the loss
    scalars: dict[str, float] = field(default_factory=dict)


class FlowDPO:
    """The ``flow_dpo`` objective of a stage; ``reference`` is attached when the stage starts."""

    def __init__(
        self,
        beta: float,
        t_mean: float = 0.0,
        t_std: float = 1.0,
        shift: float = 1.0,
        clean_first_frame: bool = False,
        t_range: tuple[float, float] = FULL_RANGE,
    ) -> None:
        self.beta, self.t_mean, self.t_std, self.shift = beta, t_mean, t_std, shift
        self.t_range = t_range  # one expert's timesteps (model.expert)
        self.t_ranges: tuple[tuple[float, float], ...] = (t_range,)  # every expert's, for step_range
        self.clean_first_frame = clean_first_frame  # token_replace (flow_matching's module docstring)
        self.reference: nn.Module | None = None  # frozen; never trained, never saved

    @classmethod
    def from_config(cls, dpo: Any, flow_matching: Any, model_cfg: Any = None) -> FlowDPO:
        """β from the recipe's ``dpo`` section; the t distribution from its ``flow_matching`` one."""
        clean = model_cfg is not None and clean_first_frame(model_cfg)
        objective = cls(
            dpo.beta, flow_matching.t_mean, flow_matching.t_std, flow_matching.shift, clean,
            expert_range(model_cfg),
        )  # fmt: skip
        objective.t_ranges = expert_ranges(model_cfg)
        return objective

    def step_range(self, seed: int, step: int) -> tuple[float, float]:
        """The range of t of optimiser step ``step`` (flow_matching's :func:`step_range`)."""
        return step_range(self.t_ranges, self.t_mean, self.t_std, self.shift, seed, step)

    def __call__(
        self,
        model: nn.Module,
        batch: PackedBatch,
        generator: torch.Generator,
        t_range: tuple[float, float] | None = None,
    ) -> FlowDPOOutput:
        """``t_range``: the step's range of t (:meth:`step_range`); None: the objective's own."""
        if self.reference is None:
            raise RuntimeError("flow DPO has no reference model: attach the frozen policy copy first")
        check_pairs(batch)
        clean = first_frame_mask(batch) if self.clean_first_frame else None
        t_range = self.t_range if t_range is None else t_range
        noised, velocity = noise_pairs(batch, self.t_mean, self.t_std, self.shift, generator, clean, t_range)
        mask = loss_mask(batch, clean)
        prediction = model(noised)
        errors = sample_errors(prediction, velocity, noised, mask)  # [B]
        with torch.no_grad():  # the reference gets no gradient, whatever its requires_grad
            reference = sample_errors(self.reference(noised), velocity, noised, mask)
        loss, margin = dpo_loss(errors[0::2], errors[1::2], reference[0::2], reference[1::2], self.beta)
        scalars = {
            "dpo/reward_margin": float(margin.detach().mean()),
            "dpo/accuracy": float((margin.detach() > 0).float().mean()),
            "dpo/error_win": float(errors[0::2].detach().mean()),
            "dpo/error_lose": float(errors[1::2].detach().mean()),
        }
        return FlowDPOOutput(loss, int(mask.sum()), task_errors(prediction, velocity, noised, mask), scalars)

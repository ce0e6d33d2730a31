"""Held-out validation: a stage's flow-matching loss (and a flow_dpo stage's preference accuracy)
on fixed held-out samples, at fixed timesteps and noise.

The numbers depend on the weights only, never on the parallel layout, the step or a resume:

- The set is the first ``validation.max_samples`` items of each task's shards, in stored order,
  decoded as the stage's training data, packed into fixed micro-batches of ``batch_size``
  samples (one task per batch, a preference pair never split): the same batches on every rank.
- Sample ``i`` (a pair: its winner's index, shared by the loser) at timestep ``j`` is noised with
  noise drawn from its own generator, seeded by ``(validation.seed, i, j)``: not from the
  training generator, whose state validation never touches, and not from the batch it sits in.
- Data-parallel rank ``r`` evaluates batches ``r, r + DP, ...``; a rank short of a batch in the
  last round runs batch 0 again and discards it (ZeRO-3 gathers each layer's weights
  collectively, so every rank runs as many forward passes). TP and CP ranks of one data rank
  evaluate the same batches, as they train on the same ones.
- Each sample's squared-error sum (float64) goes into its own row of a ``[samples, timesteps]``
  table that is zero elsewhere; the tables are summed over the data-parallel ranks, where each
  entry has one non-zero term, so the sum is exact whatever the reduction order. Totals are
  taken with :func:`math.fsum` (exactly rounded): the same whatever order they come in.

So a layout's validation loss equals one process's as far as the model's forward pass does
(bit for bit for data parallelism, within the rounding TP/SP/Ulysses give the forward pass).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from imontage.config.loader import RecipeError, stage_section
from imontage.data import heldout_items
from imontage.data.shards import ShardSpecError
from imontage.models.common.sequence import PackedBatch, PackingSpec, Sample, pack_samples
from imontage.objectives.flow_dpo import FlowDPO, check_pairs
from imontage.objectives.flow_matching import FlowMatching, first_frame_mask, loss_mask, noise_batch

log = logging.getLogger(__name__)


@dataclass
class HeldOutBatch:
    task: str
    first: int  # the set's index of its first sample
    batch: PackedBatch  # CPU tensors


@dataclass
class HeldOutSet:
    """One stage's held-out samples, in task order, and the fixed micro-batches they are packed in."""

    tasks: list[str]  # as declared
    samples: list[Sample]
    sample_tasks: list[str]  # [samples]
    batches: list[HeldOutBatch]
    pairs: bool  # [win, lose] preference pairs (a flow_dpo stage)

    def previews(self, count: int) -> list[Sample]:
        """The first ``count`` samples taken in turn from each task (of pairs, the winners)."""
        step = 2 if self.pairs else 1
        queues = [
            [s for i, s in enumerate(self.samples) if self.sample_tasks[i] == task and i % step == 0]
            for task in self.tasks
        ]
        chosen: list[Sample] = []
        for row in range(max((len(q) for q in queues), default=0)):
            chosen.extend(q[row] for q in queues if row < len(q))
        return chosen[:count]


def _key(cfg: DictConfig, index: int, key: str) -> str:
    """The full recipe key of a stage's validation setting: under the stage when it overrides it."""
    own = cfg.stages[index].validation[key.split("[")[0]] is not None
    return f"stages[{index}].validation.{key}" if own else f"validation.{key}"


def build_heldout(cfg: DictConfig, index: int, spec: PackingSpec) -> HeldOutSet | None:
    """Stage ``index``'s held-out set, or None when it validates nothing. Shards that match no file
    are a :class:`RecipeError` naming the key; a bad shard or sample raises the data layer's
    DataError naming it; a flow_dpo stage's items must be preference pairs."""
    section = stage_section(cfg, index, "validation")
    if not section.datasets or not (section.every or section.at_start or section.preview_every):
        return None
    data = stage_section(cfg, index, "data")
    pairs = cfg.stages[index].objective == "flow_dpo"
    samples: list[Sample] = []
    sample_tasks: list[str] = []
    batches: list[HeldOutBatch] = []
    for number, dataset in enumerate(section.datasets):
        key = _key(cfg, index, f"datasets[{number}].shards")
        try:
            items = heldout_items(str(dataset.shards), data, int(section.max_samples), spec)
        except ShardSpecError as error:
            raise RecipeError(f"recipe {cfg.name}: key '{key}': {error}") from error
        if not items:
            raise RecipeError(f"recipe {cfg.name}: key '{key}': the shards hold no sample")
        if pairs and any(len(item) != 2 for item in items):
            raise RecipeError(
                f"recipe {cfg.name}: key '{key}': stage '{cfg.stages[index].name}' is flow_dpo, "
                "its held-out items must be preference pairs (targets in group win|lose)"
            )
        flat = [sample for item in items for sample in item]
        for start in range(0, len(flat), int(section.batch_size)):
            chunk = flat[start : start + int(section.batch_size)]
            batch = pack_samples(chunk, spec)
            if pairs:
                check_pairs(batch)
            batches.append(HeldOutBatch(str(dataset.task), len(samples) + start, batch))
        samples.extend(flat)
        sample_tasks.extend([str(dataset.task)] * len(flat))
    tasks = [str(dataset.task) for dataset in section.datasets]
    return HeldOutSet(tasks, samples, sample_tasks, batches, pairs)


def noise_seed(seed: int, sample: int, timestep: int) -> int:
    """The seed of the noise of held-out sample ``sample`` at timestep number ``timestep``."""
    digest = hashlib.sha256(f"imontage-validation/{seed}/{sample}/{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # below 2**63, as torch's seeds must be


def held_out_noise(batch: HeldOutBatch, seed: int, timestep: int, pairs: bool) -> torch.Tensor:
    """``[N, P]`` noise of ``batch`` at timestep number ``timestep``: per sample (a pair: per winner,
    shared by its loser) from its own generator."""
    bounds = batch.batch.cu_seqlens.tolist()
    width = batch.batch.tokens.shape[1]
    rows = []
    for k in range(batch.batch.num_samples):
        owner = batch.first + (k - k % 2 if pairs else k)  # the set's index the noise belongs to
        generator = torch.Generator().manual_seed(noise_seed(seed, owner, timestep))
        rows.append(torch.randn((bounds[k + 1] - bounds[k], width), generator=generator))
    return torch.cat(rows)


def squared_errors(
    prediction: torch.Tensor, target: torch.Tensor, batch: PackedBatch, mask: torch.Tensor
) -> torch.Tensor:
    """``[B]`` float64 sum of squared errors over each sample's values that ``mask`` ``[N]`` keeps."""
    squared = (prediction.detach().float() - target.float()).pow(2).sum(dim=1).double()  # [N]
    per_sample = torch.zeros(batch.num_samples, dtype=torch.float64, device=squared.device)
    return per_sample.index_add_(0, batch.sample_index()[mask], squared[mask])


class Validator:
    """Evaluates one stage's held-out set with its objective's settings (token_replace's clean first
    frames; a flow_dpo stage's reference and β)."""

    def __init__(self, heldout: HeldOutSet, section: DictConfig, objective: FlowMatching | FlowDPO) -> None:
        self.heldout = heldout
        self.timesteps = [float(t) for t in section.timesteps]
        self.seed = int(section.seed)
        self.every, self.at_start = int(section.every), bool(section.at_start)
        self.preview_every, self.preview_count = int(section.preview_every), int(section.preview_samples)
        self.objective = objective

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def preview_due(self, step: int) -> bool:
        return self.preview_every > 0 and step % self.preview_every == 0

    def evaluate(self, model: nn.Module, backend: Any) -> dict[str, float]:
        """The validation numbers of ``model``'s current weights, alike on every rank; every rank calls it."""
        samples, steps = len(self.heldout.samples), len(self.timesteps)
        # [samples, timesteps, (squared error, values, reference squared error)], this rank's rows only
        table = torch.zeros(samples, steps, 3, dtype=torch.float64, device=backend.device)
        rank, ranks = backend.data_rank, backend.data_world_size
        batches = self.heldout.batches
        reference = self.objective.reference if isinstance(self.objective, FlowDPO) else None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), backend.autocast():
                for j, t in enumerate(self.timesteps):
                    for start in range(0, len(batches), ranks):
                        number = start + rank
                        mine = number < len(batches)
                        rows = self._evaluate(model, reference, batches[number if mine else 0], j, t, backend)
                        if mine:
                            first = batches[number].first
                            table[first : first + rows.shape[0], j] = rows
        finally:
            model.train(was_training)
        table = backend.sum_tensor_over_data(table).cpu()
        return self._metrics(table)

    def _evaluate(
        self,
        model: nn.Module,
        reference: nn.Module | None,
        held: HeldOutBatch,
        j: int,
        t: float,
        backend: Any,
    ) -> torch.Tensor:
        """``[B, 3]``: each sample's squared error, value count and reference squared error at ``t``."""
        batch = held.batch.to(backend.device)
        noise = held_out_noise(held, self.seed, j, self.heldout.pairs).to(backend.device)
        clean = first_frame_mask(batch) if self.objective.clean_first_frame else None
        noised, velocity = noise_batch(batch, torch.full((batch.num_samples,), t), noise, clean)
        mask = loss_mask(batch, clean)
        errors = squared_errors(model(noised), velocity, noised, mask)
        values = torch.bincount(batch.sample_index()[mask], minlength=batch.num_samples) * velocity.shape[1]
        reference_errors = (
            squared_errors(reference(noised), velocity, noised, mask)
            if reference is not None
            else torch.zeros_like(errors)
        )
        return torch.stack([errors, values.double(), reference_errors], dim=1)

    def _metrics(self, table: torch.Tensor) -> dict[str, float]:
        """``val`` scalars from the summed table: loss per task and over all (a flow_dpo stage: over
        the winners), and a flow_dpo stage's preference accuracy and mean implicit reward margin."""
        heldout = self.heldout
        counted = range(0, len(heldout.samples), 2) if heldout.pairs else range(len(heldout.samples))
        metrics: dict[str, float] = {}
        per_task: dict[str, tuple[list[float], list[float]]] = {task: ([], []) for task in heldout.tasks}
        for i in counted:
            errors, values = per_task[heldout.sample_tasks[i]]
            errors.extend(table[i, :, 0].tolist())
            values.extend(table[i, :, 1].tolist())
        metrics["loss"] = math.fsum(e for es, _ in per_task.values() for e in es) / max(
            math.fsum(v for _, vs in per_task.values() for v in vs), 1.0
        )
        for task, (errors, values) in per_task.items():
            metrics[f"loss/{task}"] = math.fsum(errors) / max(math.fsum(values), 1.0)
        if heldout.pairs:
            assert isinstance(self.objective, FlowDPO)
            metrics.update(preference_metrics(table, heldout, self.objective.beta))
        return metrics


def preference_metrics(table: torch.Tensor, heldout: HeldOutSet, beta: float) -> dict[str, float]:
    """A flow_dpo stage's held-out preferences from the summed ``[samples, timesteps, 3]`` table. Per
    pair, the implicit reward margin ``−β/2 · mean over t of [(e_w − e_w_ref) − (e_l − e_l_ref)]``
    (``e``: mean squared error per target value); accuracy: the share of pairs with a positive one."""
    errors = table[:, :, 0] / table[:, :, 1].clamp(min=1)  # [samples, timesteps]
    reference = table[:, :, 2] / table[:, :, 1].clamp(min=1)
    margins: dict[str, list[float]] = {task: [] for task in heldout.tasks}
    for win in range(0, len(heldout.samples), 2):
        lose = win + 1
        gaps = ((errors[win] - reference[win]) - (errors[lose] - reference[lose])).tolist()
        margins[heldout.sample_tasks[win]].append(-beta / 2 * math.fsum(gaps) / len(gaps))
    every = [m for ms in margins.values() for m in ms]
    metrics = {
        "dpo/accuracy": sum(m > 0 for m in every) / len(every),
        "dpo/reward_margin": math.fsum(every) / len(every),
    }
    for task, ms in margins.items():
        metrics[f"dpo/accuracy/{task}"] = sum(m > 0 for m in ms) / len(ms)
    return metrics


def progress_line(step: int, stage: str, metrics: dict[str, float]) -> str:
    """The console line of one validation: the loss over all, per task, and DPO's accuracy."""
    tasks = ", ".join(
        f"{name[5:]} {value:.4f}" for name, value in metrics.items() if name.startswith("loss/")
    )
    line = f"step {step} (stage {stage}) validation: loss {metrics['loss']:.4f} ({tasks})"
    if "dpo/accuracy" in metrics:
        line += f", preference accuracy {metrics['dpo/accuracy']:.3f}"
    return line


def build_validators(cfg: DictConfig, stages: list[Any], spec: PackingSpec) -> dict[int, Validator]:
    """A :class:`Validator` for each of ``stages`` that validates (by stage index); built before
    training, so that a wrong held-out set fails the run before its first step."""
    validators = {}
    for stage in stages:
        heldout = build_heldout(cfg, stage.index, spec)
        if heldout is not None:
            section = stage_section(cfg, stage.index, "validation")
            validators[stage.index] = Validator(heldout, section, stage.objective)
    return validators

"""One GPU's memory in a ZeRO-3 training step: parameters, gradients, optimiser state and activations.

:func:`estimate_memory` counts the parameters of a model built on the meta device as the layout
stores them (:func:`parameter_census`) and what autograd keeps (:func:`activations`: each family's
part, ``ModelFamily.cost``, with a frozen base's savings where ``model.lora`` is set);
:func:`zero3_traffic` gives ZeRO-3's own collectives, which the per-layer plan leaves out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from imontage.cost.shape import family_cost
from imontage.models.common.cost import (
    Activations,
    BlockActivations,
    Layout,
    MicroBatch,
    ModelShape,
    PlanError,
    Saved,
    Shards,
)
from imontage.models.common.experts import expert_networks
from imontage.models.lora import adapted_modules
from imontage.parallel.parallelize import check_layout, family_plan, tensor_split


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what DeepSpeed holds (``train.precision``)."""

    name: str
    parameter_bytes: int  # the working copy ZeRO-3 partitions and gathers
    gradient_bytes: int  # the gradient partition (DeepSpeed's default: the model's dtype)
    master_bytes: int  # the fp32 master copy (0: the working copy is fp32 and is its own master)
    optimizer_bytes: int  # Adam's two fp32 moments
    ema_bytes: int  # imontage's EMA (fp32, partitioned like the optimiser state)
    activation_bytes: int


PRECISIONS = {
    "bf16": Precision("bf16", 2, 2, 4, 8, 4, 2),
    "fp32": Precision("fp32", 4, 4, 0, 8, 4, 4),
}
# The engine's ZeRO-3 buckets (``imontage.parallel.engine.zero3_config``), in units of one block.
REDUCE_BUCKET_BLOCKS = 1
MAX_LIVE_BLOCKS = 3


@dataclass(frozen=True)
class ParameterCensus:
    """Parameter elements, counted from a model built on the meta device."""

    model: int  # the single-device model
    rank: int  # one TP rank's share: tensors every rank keeps whole, plus its slices
    rank_trainable: int  # of which trainable (their gradients are reduce-scattered)
    trainable: int  # this rank's ZeRO-3 partition of the trainable parameters (⌈share / ZeRO ranks⌉ each)
    frozen: int  # its partition of the frozen ones (no gradient, no optimiser state)
    block: int  # one TP rank's share of the largest block: the engine's bucket unit
    networks: int = 1  # networks of the model: its experts' (Wan 2.2 A14B, both in one run), or one
    # One TP rank's share of the network a step runs (and of its trainable parameters): ZeRO-3
    # gathers and reduces only those; 0: the whole model (``rank``, ``rank_trainable``).
    step: int = 0
    step_trainable: int = 0

    @property
    def step_rank(self) -> int:
        """One TP rank's share of the parameters a step gathers: the running network's."""
        return self.step or self.rank

    @property
    def step_rank_trainable(self) -> int:
        """Of which trainable: the gradients a step reduce-scatters."""
        return self.step_trainable if self.step else self.rank_trainable


def parameter_census(model: nn.Module, layout: Layout) -> ParameterCensus:
    """Count ``model``'s parameters (built with ``device="meta"``) as ``layout`` stores them.

    TP slices come from :func:`imontage.parallel.parallelize.tensor_split` (the tables that cut the
    weights); a TP layout the model cannot take is refused with ``check_layout``'s message. Trainable
    means ``requires_grad``: a model whose base weights are frozen (adapters) counts only the
    adapters' gradients and optimiser state.

    A model of several experts in one run (:class:`~imontage.models.common.experts.TimestepExperts`)
    is one ZeRO-3 engine over every network: every expert's parameters, gradients and optimiser
    state are partitioned, while a step runs, gathers and reduces one network (``step``); each
    network is cut and bucketed as the engine does it (``parallelize_model``, ``zero3_config``).
    """
    networks = expert_networks(model)
    plan = None
    if layout.tensor > 1:  # the TP cuts are the family's parallel plan's (refused for a family without one)
        for _, network in networks:
            check_layout(network, layout.tensor, layout.context)
        plan = family_plan(networks[0][1])
    trainable = frozen = rank_trainable = 0
    blocks, steps = [], []
    cut: dict[tuple[int, tuple[int, ...]], int] = {}  # (split, shape): share; every block is cut alike
    for prefix, network in networks:
        shares: dict[str, int] = {}
        network_trainable = 0
        for name, param in network.named_parameters():
            split = tensor_split(name, plan) if plan is not None else None
            share = param.numel()
            if split is not None:
                key = (id(split), tuple(param.shape))
                if key not in cut:
                    try:
                        cut[key] = split.shard(
                            torch.empty(param.shape, device="meta"), 0, layout.tensor
                        ).numel()
                    except ValueError as error:
                        raise PlanError(f"{prefix}{name} {tuple(param.shape)}: {error}") from None
                share = cut[key]
            shares[name] = share
            partition = -(-share // layout.zero)  # DeepSpeed pads each parameter's partitions equally
            if param.requires_grad:
                trainable += partition
                network_trainable += share
            else:
                frozen += partition
        rank_trainable += network_trainable
        blocks.append(_bucket_block(network, shares))
        steps.append((sum(shares.values()), network_trainable))
    step, step_trainable = max(steps)
    several = len(networks) > 1
    return ParameterCensus(
        model=sum(p.numel() for p in model.parameters()),
        rank=sum(share for share, _ in steps),
        rank_trainable=rank_trainable,
        trainable=trainable,
        frozen=frozen,
        block=max(blocks),
        networks=len(networks),
        step=step if several else 0,
        step_trainable=step_trainable if several else 0,
    )


def _bucket_block(model: nn.Module, shares: Mapping[str, int]) -> int:
    """``engine.block_numel`` on one rank's shares of one network: the largest transformer block
    (of every list the family's plan names: HunyuanVideo has two), or the whole network when it has none."""
    try:
        lists = set(family_plan(model).blocks)
    except ValueError:  # a family without a plan: the engine looks for model.blocks
        lists = {"blocks"}
    per_block: dict[tuple[str, str], int] = defaultdict(int)
    for name, share in shares.items():
        parts = name.split(".")
        if parts[0] in lists and len(parts) > 2:
            per_block[(parts[0], parts[1])] += share
    return max(per_block.values()) if per_block else sum(shares.values())


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, element_bytes: int) -> Activations:
    """What autograd keeps, per rank, for one micro-batch (the terms are listed in each family's
    function; :func:`estimate_memory` says what is not counted).

    Assumes the GPU kernels: flash attention keeps q, k, v, its output and the fp32 log-sum-exp
    ``[h, n]``; the fused RoPE keeps only the positions and the fused QK-norm + RoPE its q and k
    inputs; RMSNorm (the fused CUDA kernel) its input and the fp32 rstd; LayerNorm its input and
    fp32 mean and rstd. Integer tensors (positions, row indices: ≤ 24 bytes a token) are not counted.
    """
    full = family_cost(model.family).activations(model, batch, layout, element_bytes)
    if model.adapters:
        _check_lora_modelled(model, layout)
        return _with_adapters(full, model, batch, layout)
    return full


# ----------------------------------------------------------------------------- LoRA activations
def _check_lora_modelled(model: ModelShape, layout: Layout) -> None:
    """Refuse the ``model.lora`` cases whose activations are not modelled (and measured)."""
    what = None
    if model.lora_trainable:
        what = "model.lora.trainable (parameters trained beside the adapters)"
    elif model.lora_rank == 0:
        what = "model.lora without adapters"
    elif family_cost(model.family).lora is None:
        what = f"adapters on the {model.family} family"
    elif model.lora_dropout > 0:
        what = f"model.lora.dropout={model.lora_dropout} (its masks and dropped inputs)"
    elif layout.tensor > 1:
        what = "adapters under tensor parallelism (their cut factors and gathered h)"
    if what is not None:
        raise PlanError(
            f"model.lora: the activation estimate does not model {what} yet; it models adapters "
            "(dropout 0) on every attention and FFN linear of the blocks, without TP"
        )


def lora_block_linears(model: ModelShape) -> tuple[str, ...]:
    """The linears of one block the modelled ``model.lora`` adapts (the family's ``LoraCost``)."""
    lora = family_cost(model.family).lora
    assert lora is not None, model.family  # _check_lora_modelled refuses a family without
    return lora.block_linears + (lora.image_linears if model.image_dim else ())


def lora_blocks(model: ModelShape) -> str:
    """The module list of the blocks the modelled ``model.lora`` adapts (``blocks.*.<linear>``)."""
    lora = family_cost(model.family).lora
    assert lora is not None, model.family  # _check_lora_modelled refuses a family without
    return lora.blocks


def _with_adapters(full: Activations, model: ModelShape, batch: MicroBatch, layout: Layout) -> Activations:
    """What autograd keeps with the base frozen and adapters on :func:`lora_block_linears`: the full
    fine-tuning lists less what only the frozen weights' gradients needed, plus each adapter's
    ``h = A x`` ``[rows, rank]`` (B's input; A's input ``x`` is the layer's, kept already)."""
    lora = family_cost(model.family).lora
    assert lora is not None, model.family  # _check_lora_modelled refuses a family without
    (block,) = full.blocks
    e = block.inputs[0].element_bytes
    n, r = Shards.of(batch.sequence(model), layout).sequence, model.lora_rank
    rows = dict.fromkeys(lora_block_linears(model), n) | lora.rows(model, batch, layout)
    adapters = tuple(Saved(f"{name}.lora_h", count, r, e) for name, count in rows.items() if count)
    saved = tuple(s for s in block.saved if s.name not in lora.dropped) + adapters
    first = tuple(s for s in saved if s.name not in lora.first_dropped)
    blocks = (BlockActivations(block.name, block.count, saved, block.inputs, first),)
    outside = tuple(s for s in full.outside if s.name in lora.outside)
    # The first block no longer keeps its input (a slice of a whole stream): only its checkpoint does.
    view = full.first_block_view if full.checkpointing else ()
    return Activations(blocks, outside, full.shared_inputs, full.checkpointing, view)


@dataclass(frozen=True)
class MemoryEstimate:
    """One GPU's memory in a ZeRO-3 step, by term, in bytes (:func:`estimate_memory`)."""

    census: ParameterCensus
    layout: Layout
    precision: Precision
    activations: Activations
    ema: bool

    def terms(self) -> list[tuple[str, int]]:
        c, p = self.census, self.precision
        gathered = min(MAX_LIVE_BLOCKS * c.block, c.step_rank)
        return [
            (f"{p.name} weights, ZeRO-3 partition", (c.trainable + c.frozen) * p.parameter_bytes),
            (f"{p.name} weights gathered (≤ {MAX_LIVE_BLOCKS} blocks live)", gathered * p.parameter_bytes),
            (f"{p.name} gradients, ZeRO-3 partition", c.trainable * p.gradient_bytes),
            ("gradient reduce bucket (1 block)", REDUCE_BUCKET_BLOCKS * c.block * p.gradient_bytes),
            ("fp32 master weights", c.trainable * p.master_bytes),
            ("fp32 Adam moments", c.trainable * p.optimizer_bytes),
            ("fp32 EMA", c.trainable * p.ema_bytes if self.ema else 0),
            ("activations (peak)", self.activations.peak),
        ]

    @property
    def total(self) -> int:
        return sum(value for _, value in self.terms())


def estimate_memory(
    module: nn.Module,
    model: ModelShape,
    batch: MicroBatch,
    layout: Layout,
    precision: Precision = PRECISIONS["bf16"],
    ema: bool = True,
) -> MemoryEstimate:
    """One GPU's memory for a training step under DeepSpeed ZeRO-3 (imontage's engine settings).

    ``module``: the model built on the meta device (``build_model(cfg, device="meta")``): the
    parameter counts and TP slices are read from it (:func:`parameter_census`): frozen parameters
    (``model.lora``'s base) cost only their working copy. ``model``: its shape
    (:meth:`ModelShape.from_config`), for the activations (:func:`activations`, which refuses
    adapters until what they keep is modelled).

    Counted: the parameters' working copy (partitioned over the ZeRO ranks = DP × CP, each TP rank
    holding its slices), the parameters gathered for the blocks running (DeepSpeed's
    ``stage3_max_live_parameters``, 3 blocks), the gradient partition and one reduce bucket (1
    block), the fp32 master copy and Adam's two moments, the EMA (``train.ema_decay > 0``), and the
    activations autograd keeps at the start of the backward pass. Not counted: temporary buffers
    (an op's workspace, the gradients of activations during the backward pass, megatron-core's
    all-gather buffers, the loss), the caching allocator's fragmentation, the CUDA context and
    NCCL's buffers (together often 2-5 GiB or more), and the start-up (the backends build the whole
    model in fp32 on every GPU before cutting it: ``census.model × 4`` bytes).
    """
    ranks = layout.tensor * layout.context
    if model.num_heads % ranks:
        raise PlanError(
            f"model.num_heads={model.num_heads} is not divisible by tensor_parallel × context_parallel = "
            f"{layout.tensor} × {layout.context}: each rank needs whole heads"
        )
    if model.adapters and model.lora_rank > 0 and family_cost(model.family).lora is not None:
        _check_lora_targets(module, model)
    census = parameter_census(module, layout)
    kept = activations(model, batch, layout, precision.activation_bytes)
    return MemoryEstimate(census, layout, precision, kept, ema)


def _check_lora_targets(module: nn.Module, model: ModelShape) -> None:
    """The adapters ``module`` carries must be the modelled ones (:func:`lora_block_linears`)."""
    blocks = lora_blocks(model)
    modelled = {f"{blocks}.{i}.{leaf}" for i in range(model.depth) for leaf in lora_block_linears(model)}
    for prefix, network in expert_networks(module):  # each expert's network, adapted alike
        adapted = {name for name, _ in adapted_modules(network)}
        if adapted == modelled:
            continue
        odd = [prefix + name for name in sorted(adapted - modelled) or sorted(modelled - adapted)]
        raise PlanError(
            f"model.lora.targets: the activation estimate models adapters on every attention and FFN "
            f"linear of the blocks ({', '.join(f'{blocks}.*.{leaf}' for leaf in lora_block_linears(model))}) "
            f"and no other; these targets {'also adapt' if adapted - modelled else 'leave out'} {odd[0]}"
        )


def zero3_traffic(census: ParameterCensus, layout: Layout, precision: Precision) -> dict[str, float]:
    """Bytes one rank sends in ZeRO-3's own collectives per micro-batch, with ring algorithms.

    Each parameter is all-gathered for the forward pass and again for the backward pass (the
    recompute under activation checkpointing reuses the backward's gather), and each trainable
    parameter's gradient is reduce-scattered once. Not part of :func:`communication_plan` (its calls depend on the buckets). With several experts
    in one run, only the network a step runs is gathered and reduced.
    """
    share = (layout.zero - 1) / layout.zero
    return {
        "all_gather": 2 * census.step_rank * precision.parameter_bytes * share,
        "reduce_scatter": census.step_rank_trainable * precision.gradient_bytes * share,
    }


# ------------------------------------------------------------------------------------ printing
def format_memory(estimate: MemoryEstimate) -> str:
    """A table of the estimate's terms in GiB, and how the activations add up."""
    c, kept = estimate.census, estimate.activations
    lines = [
        f"parameters: {c.model / 1e9:.3f}e9 in the model, {c.rank / 1e9:.3f}e9 per TP rank, "
        f"ZeRO-3 partition {(c.trainable + c.frozen) / 1e9:.3f}e9 ({c.frozen / 1e9:.3f}e9 frozen), "
        f"largest block {c.block / 1e6:.1f}e6"
        + (
            f"; {c.networks} experts, a step runs one: {c.step_rank / 1e9:.3f}e9 per TP rank"
            if c.networks > 1
            else ""
        ),
    ]
    width = max(len(name) for name, _ in estimate.terms())
    lines += [f"  {name:<{width}} {value / 2**30:>9.2f} GiB" for name, value in estimate.terms()]
    lines.append(f"  {'total':<{width}} {estimate.total / 2**30:>9.2f} GiB")
    blocks = ", ".join(
        f"{b.count} × {b.bytes / 2**30:.3f} GiB ({b.name}; checkpointed {b.input_bytes / 2**30:.3f}"
        + (f"; the first {b.first_bytes / 2**30:.3f}" if b.first is not None else "")
        + ")"
        for b in kept.blocks
    )
    lines.append(f"  activations: outside the blocks {kept.outside_bytes / 2**30:.2f} GiB, blocks {blocks}")
    return "\n".join(lines)

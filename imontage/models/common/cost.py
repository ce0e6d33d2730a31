"""The terms a family's cost model is written in: what one training step of a parallel model exchanges and keeps.

:mod:`imontage.cost` derives a step's collectives and one GPU's memory from a model's shape, a
micro-batch and a layout; what differs between families (which linears are cut, what each block
keeps for the backward pass, what a frozen base no longer keeps) is each family's
:class:`FamilyCost`, in its folder's ``cost.py`` and reached through its registry record
(``ModelFamily.cost``). The shapes, rows and saved tensors those parts are written with are here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


FP32 = 4  # bytes: norms' statistics, Wan's fp32 norms and modulation, flash attention's log-sum-exp


class PlanError(ValueError):
    """A model or layout the plan or the estimate cannot describe; the message says which and why."""


@dataclass(frozen=True)
class Collective:
    """One kind of collective call of a training step, made ``count`` times."""

    where: str  # "block.proj", "outputs", ...
    op: str  # one of OPS
    group: str  # "tp" or "cp"
    group_size: int
    numel: int  # elements of the logical tensor
    element_bytes: int
    phase: str  # "forward" or "backward"
    count: int = 1

    @property
    def bytes(self) -> int:
        """Logical bytes of all ``count`` calls."""
        return self.numel * self.element_bytes * self.count

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends with ring algorithms, all ``count`` calls."""
        p = self.group_size
        factor = 2 * (p - 1) / p if self.op == "all_reduce" else (p - 1) / p
        return self.bytes * factor


@dataclass(frozen=True)
class ModelShape:
    """What the plan and the activation estimate need of a model configuration."""

    hidden_size: int
    num_heads: int
    depth: int  # blocks (HunyuanVideo: dual-stream blocks)
    patch_features: int  # output features per visual token, C_out·pt·ph·pw (the DiT's input too)
    family: str  # model.family: its record's cost model (FamilyCost) gives the rest
    mlp_hidden_size: int = 0  # 0: 4 × hidden_size
    in_features: int = 0  # the patch embedding's input, channel condition included (0: patch_features)
    qk_norm: bool = True
    text_dim: int = 0  # width of the text embeddings the model reads
    text_len: int = 0  # Wan: each sample's text context is zero-padded to this (0: unpadded)
    image_dim: int = 0  # I2V: width of the image-encoder tokens (0: text-to-video)
    image_tokens: int = 0  # I2V: image-encoder tokens per sample (tools/plan.py's default --image-tokens)
    added_kv_dim: int = 0  # Wan I2V: input width of the image keys' and values' projections
    cross_attn_norm: bool = True  # Wan: a LayerNorm before the cross-attention
    freq_dim: int = 256  # sinusoidal timestep features
    text_in_sequence: bool = False  # the DiT packs the text tokens into the sequence its blocks run
    single_blocks: int = 0  # HunyuanVideo: single-stream blocks after the dual-stream ones
    refiner_blocks: int = 0  # HunyuanVideo: blocks of the text token refiner
    pooled_dim: int = 0  # HunyuanVideo: pooled text vector width
    guidance: bool = False  # HunyuanVideo: distilled guidance embedding
    # model.lora: a frozen base; rank > 0 adds adapters (see activations() for what is modelled)
    lora_rank: int = 0
    lora_dropout: float = 0.0
    lora_trainable: bool = False  # model.lora.trainable lists parameters trained beside the adapters

    @property
    def adapters(self) -> bool:
        """Whether ``model.lora`` freezes the base (adapters, or a partial fine-tuning list)."""
        return self.lora_rank > 0 or self.lora_trainable

    @property
    def mlp(self) -> int:
        return self.mlp_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, cfg: Any, **family: Any) -> ModelShape:
        """The shape of the model config ``cfg``: what every family has, then ``family``: the fields
        its family's :attr:`FamilyCost.shape` gives (``patch_features`` at least)."""
        lora = getattr(cfg, "lora", None)
        return cls(
            lora_rank=int(lora.rank) if lora is not None else 0,
            lora_dropout=float(lora.dropout) if lora is not None else 0.0,
            lora_trainable=lora is not None and bool(list(lora.trainable)),
            hidden_size=int(cfg.hidden_size),
            num_heads=int(cfg.num_heads),
            depth=int(cfg.depth),
            family=str(cfg.family),
            mlp_hidden_size=int(cfg.mlp_hidden_size),
            in_features=int(cfg.in_channels) * patch_volume(cfg),
            qk_norm=bool(cfg.qk_norm),
            text_dim=int(cfg.text_dim),
            **family,
        )

    def context_rows(self, batch: MicroBatch) -> int:
        """Wan: rows of the cross-attention's text context (each sample padded to ``text_len``)."""
        return batch.samples * self.text_len if self.text_len else batch.text_tokens


@dataclass(frozen=True)
class MicroBatch:
    """One packed micro-batch, in rows; counts are over all its samples."""

    tokens: int  # visual (patch) tokens
    text_tokens: int = 0  # the DiT packs them into its sequence; Wan and HunyuanVideo keep them apart
    samples: int = 1
    image_tokens: int = 0  # I2V: image-encoder tokens (Wan: CLIP's, HunyuanVideo 1.5: SigLIP's)
    text_tokens_2: int = 0  # of ``text_tokens``, those of a second text encoder (HunyuanVideo 1.5: ByT5)

    def sequence(self, model: ModelShape) -> int:
        """Rows of the stream the blocks run: the whole packed sequence where the text is in it, else the visual rows."""
        return self.tokens + self.text_tokens if model.text_in_sequence else self.tokens


@dataclass(frozen=True)
class Layout:
    """A parallel layout: ``world = DP × CP × TP`` ranks; ZeRO shards over the DP × CP ranks."""

    tensor: int = 1
    context: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    world: int = 0  # ranks of the job; 0: one TP × CP group

    def __post_init__(self) -> None:
        if self.tensor < 1 or self.context < 1:
            raise PlanError(f"parallel sizes must be >= 1 (tensor {self.tensor}, context {self.context})")
        if self.sequence_parallel and self.tensor == 1:
            raise PlanError(
                "sequence_parallel needs tensor_parallel > 1: it shards activations over the TP group"
            )
        if self.ranks % (self.tensor * self.context):
            raise PlanError(
                f"{self.ranks} GPUs do not divide into tensor_parallel × context_parallel = "
                f"{self.tensor} × {self.context}"
            )

    @property
    def ranks(self) -> int:
        return self.world or self.tensor * self.context

    @property
    def data(self) -> int:
        return self.ranks // (self.tensor * self.context)

    @property
    def zero(self) -> int:
        """Ranks ZeRO-3 shards over: DP × CP (``imontage.parallel.engine.MegatronMPU``)."""
        return self.ranks // self.tensor

    @classmethod
    def from_config(cls, parallel: Any, world: int = 0) -> Layout:
        """From a ``ParallelConfig``."""
        return cls(
            int(parallel.tensor_parallel),
            int(parallel.context_parallel),
            bool(parallel.sequence_parallel),
            bool(parallel.activation_checkpointing),
            world,
        )

    def describe(self) -> str:
        return (
            f"{self.ranks} GPUs = DP {self.data} × CP {self.context} × TP {self.tensor}"
            f"{' + SP' if self.sequence_parallel else ''}, ZeRO-3 over {self.zero}, "
            f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}"
        )


def padded_tokens(tokens: int, tensor: int, context: int, sequence_parallel: bool) -> int:
    """A stream's length after padding to whole shards (``pad_packed_batch``)."""
    multiple = context * (tensor if sequence_parallel else 1)
    return tokens + (-tokens % multiple)


@dataclass(frozen=True)
class Shards:
    """The rows of one stream (padded to whole shards) that one rank holds."""

    total: int  # the padded stream
    sequence: int  # one CP shard (n): attention and the column-parallel outputs see these
    residual: int  # the residual stream between the parallel linears (s): n/TP under SP

    @classmethod
    def of(cls, rows: int, layout: Layout) -> Shards:
        total = padded_tokens(rows, layout.tensor, layout.context, layout.sequence_parallel)
        n = total // layout.context
        return cls(total, n, n // layout.tensor if layout.sequence_parallel else n)


class CallPlan:
    """Builds a plan: a block's collectives count once per block (forward ones twice under recompute)."""

    def __init__(self, model: ModelShape, layout: Layout, element_bytes: int) -> None:
        self.model, self.layout, self.element_bytes = model, layout, element_bytes
        self.plan: list[Collective] = []

    def add(
        self,
        where: str,
        op: str,
        group: str,
        numel: int,
        phase: str,
        count: int | None = None,
        element_bytes: int | None = None,
    ) -> None:
        count = self.model.depth if count is None else count
        if phase == "forward" and where.startswith("block.") and self.layout.activation_checkpointing:
            count *= 2  # the backward pass runs each block's forward again
        size = self.layout.tensor if group == "tp" else self.layout.context
        nbytes = self.element_bytes if element_bytes is None else element_bytes
        self.plan.append(Collective(where, op, group, size, numel, nbytes, phase, count))

    def columns(self, paths: Iterable[str], numel: int) -> None:
        """Column-parallel layers on the residual rows: SP gathers the input (twice: the backward
        gathers it again for the weight gradient) and reduce-scatters its gradient; TP all-reduces it."""
        for where in paths:
            if self.layout.sequence_parallel:
                self.add(where, "all_gather", "tp", numel, "forward")
                self.add(where, "all_gather", "tp", numel, "backward")
                self.add(where, "reduce_scatter", "tp", numel, "backward")
            else:
                self.add(where, "all_reduce", "tp", numel, "backward")

    def rows(self, paths: Iterable[str], numel: int) -> None:
        """Row-parallel layers: their partial outputs are all-reduced (SP: reduce-scattered)."""
        for where in paths:
            if self.layout.sequence_parallel:
                self.add(where, "reduce_scatter", "tp", numel, "forward")
                self.add(where, "all_gather", "tp", numel, "backward")
            else:
                self.add(where, "all_reduce", "tp", numel, "forward")

    def summed_gradients(self, grads: Iterable[tuple[str, int]]) -> None:
        """Whole parameters that see part of the work: a hook sums their gradients over TP."""
        for where, numel in grads:
            self.add(where, "all_reduce", "tp", numel, "backward")


@dataclass(frozen=True)
class Saved:
    """A tensor autograd keeps for the backward pass, on one rank: ``rows × features`` elements."""

    name: str  # says which tensor: a name saved twice is one tensor
    rows: int
    features: int
    element_bytes: int

    @property
    def bytes(self) -> int:
        return self.rows * self.features * self.element_bytes


@dataclass(frozen=True)
class BlockActivations:
    """``count`` blocks of one kind: what one keeps, and what it keeps when checkpointed."""

    name: str
    count: int
    saved: tuple[Saved, ...]  # without activation checkpointing
    inputs: tuple[Saved, ...]  # with it: the block's own inputs
    # What the first block keeps when it differs (a frozen base: its input needs no gradient).
    first: tuple[Saved, ...] | None = None

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.saved)

    @property
    def first_bytes(self) -> int:
        return self.bytes if self.first is None else sum(s.bytes for s in self.first)

    @property
    def total_bytes(self) -> int:
        """All ``count`` blocks, without checkpointing."""
        return self.first_bytes + (self.count - 1) * self.bytes if self.count else 0

    @property
    def input_bytes(self) -> int:
        return sum(s.bytes for s in self.inputs)


@dataclass(frozen=True)
class Activations:
    """What autograd keeps on one rank at the start of the backward pass (its peak).

    Without checkpointing: ``outside`` + every block's ``saved``. With it: ``outside``, the inputs
    all checkpointed blocks share (``shared_inputs``), each block's own inputs, and one block's
    ``saved`` (its forward runs again in the backward pass). Both: ``first_block_view``.
    """

    blocks: tuple[BlockActivations, ...]
    outside: tuple[Saved, ...]  # embeddings, text context, output layer, tensors every block reads
    shared_inputs: tuple[Saved, ...]
    checkpointing: bool
    # Under SP the first block's input is a slice of the whole embedding output (megatron-core's
    # scatter does not copy): where the block (or its checkpoint) keeps it, the other rows stay too.
    first_block_view: tuple[Saved, ...] = ()

    @property
    def outside_bytes(self) -> int:
        return sum(s.bytes for s in self.outside)

    @property
    def view_bytes(self) -> int:
        return sum(s.bytes for s in self.first_block_view)

    @property
    def peak(self) -> int:
        if not self.checkpointing:
            return self.outside_bytes + self.view_bytes + sum(b.total_bytes for b in self.blocks)
        return (
            self.outside_bytes
            + self.view_bytes
            + sum(s.bytes for s in self.shared_inputs)
            + sum(b.count * b.input_bytes for b in self.blocks)
            + max(max(b.bytes, b.first_bytes) for b in self.blocks)
        )


class Kept:
    """Saved tensors by name: adding a name twice keeps one (two views of one storage)."""

    def __init__(self, element_bytes: int) -> None:
        self.e = element_bytes
        self.items: dict[str, Saved] = {}

    def add(self, name: str, rows: int, features: int, element_bytes: int | None = None) -> None:
        if rows and features:
            self.items.setdefault(
                name, Saved(name, rows, features, self.e if element_bytes is None else element_bytes)
            )

    def float32(self, name: str, rows: int, features: int) -> None:
        """``x.float()`` of a model-dtype tensor ``name``: a new fp32 copy, or ``x`` itself in fp32."""
        self.add(name if self.e == FP32 else f"{name}.float", rows, features, FP32)

    def stats(self, name: str, rows: int) -> None:
        """A LayerNorm's mean and rstd, fp32 ``[rows, 1]`` each."""
        self.add(f"{name}.stats", rows, 2, FP32)

    def saved(self) -> tuple[Saved, ...]:
        return tuple(self.items.values())


def dims(model: ModelShape, layout: Layout) -> tuple[int, int, int, int]:
    """Hidden size, and one TP rank's attention width, heads and MLP width."""
    t = layout.tensor
    return model.hidden_size, model.hidden_size // t, model.num_heads // t, model.mlp // t


def self_attention(k: Kept, prefix: str, n: int, a: int, h: int, context: int, v: str) -> None:
    """Flash attention over ``n`` query rows (``v``: the name of the value tensor it keeps).

    Under Ulysses it keeps the all-to-all's q|k|v buffer and its output in head form, and the
    output projection keeps the output traded back to sequence form."""
    if context == 1:
        k.add(f"{prefix}.q", n, a)
        k.add(f"{prefix}.k", n, a)
        k.add(v, n, a)
    else:
        k.add(f"{prefix}.qkv_heads", n, 3 * a)
        k.add(f"{prefix}.out_heads", n, a)
    k.add(f"{prefix}.out", n, a)
    k.add(f"{prefix}.lse", n, h, FP32)


def patch_volume(cfg: Any) -> int:
    """``pt·ph·pw`` of a model config: the voxels one token covers."""
    return math.prod(int(p) for p in cfg.patch_size)


@dataclass(frozen=True)
class LoraCost:
    """What the modelled ``model.lora`` (adapters on every attention and FFN linear of the blocks,
    dropout 0, no TP) changes in a family's activations (``imontage.cost.activations``)."""

    block_linears: tuple[str, ...]  # the linears of one block it must adapt
    # What a frozen base no longer keeps (names of the full fine-tuning lists): a linear whose
    # weight needs no gradient does not save its input (PyTorch saves mm's ``self`` only for the
    # weight's gradient); a product with a frozen modulation keeps the modulation for the other
    # factor's gradient but not that factor (norm.out · (1 + scale), the gated outputs).
    dropped: tuple[str, ...]
    # Outside the blocks every embedding is frozen and its input needs no gradient: what is kept
    # still (the output layer's norm, the scale it is multiplied by, a context adapters read).
    outside: tuple[str, ...]
    image_linears: tuple[str, ...] = ()  # adapted too when the model reads image tokens
    # (model, batch, layout) -> one rank's rows of the linears that do not read the sequence's own rows
    rows: Callable[[ModelShape, MicroBatch, Layout], dict[str, int]] = lambda model, batch, layout: {}
    blocks: str = "blocks"  # the module list of the blocks the adapters sit in
    # What the first block no longer keeps: it reads the frozen embeddings, so its input needs no
    # gradient: its first norm keeps nothing, nor does that norm's modulation product.
    first_dropped: tuple[str, ...] = ("x", "x.float", "norm1.stats", "norm1.scale")


@dataclass(frozen=True)
class FamilyCost:
    """A family's part of the cost model (module docstring)."""

    # (model config) -> the ModelShape fields of the family: patch_features, and its own widths
    shape: Callable[[Any], dict[str, Any]]
    # (model, batch, layout, element bytes) -> what autograd keeps on one rank for a micro-batch
    activations: Callable[[ModelShape, MicroBatch, Layout, int], Activations]
    # Adds a block's tensor-parallel collectives to the plan on ``n`` sequence rows (calls, model,
    # n, batch); None: the family has no communication plan yet.
    tensor_parallel: Callable[[CallPlan, ModelShape, int, MicroBatch], None] | None = None
    attention: str = "block"  # the module whose self-attention Ulysses' all-to-alls run around
    lora: LoraCost | None = None  # None: adapters on the family are not modelled yet
    # Rows one CP rank's attention sees (model, batch, layout); None: the CP shard of batch.sequence
    # (a dual-stream family attends its visual and text shards jointly).
    attention_rows: Callable[[ModelShape, MicroBatch, Layout], int] | None = None
    # Outside the blocks under SP (calls, model, batch): None: the embeddings' and modulation's
    # gradients and the blocks' output all-gathered on the sequence rows (DiT, Wan).
    sequence_parallel_outside: Callable[[CallPlan, ModelShape, MicroBatch], None] | None = None

"""What one training step of a parallel model exchanges and holds per GPU, and counters to check it.

:func:`communication_plan` derives, from the model's shape, the micro-batch and the layout, every
collective of one forward + backward pass of the parallel model, for the DiT and Wan 2.1 (ZeRO's
parameter gathers and gradient reductions are not in it: they depend on the engine's buckets, not
on the layout; :func:`zero3_traffic` gives their volume). :func:`estimate_memory` estimates one
GPU's memory: parameters, gradients, optimiser state and activations. :func:`count_collectives`
and :func:`count_saved_tensors` count what a real step makes and keeps, so tests hold both to the
truth.

Sizes are *logical*: the whole tensor an operation produces or consumes (an all-gather's output,
a reduce-scatter's input, an all-reduce's or all-to-all's buffer). What one rank puts on the wire
with ring algorithms follows from it: ``2(p−1)/p`` of it for an all-reduce, ``(p−1)/p`` for the
other three.

Rows: ``n`` tokens per CP shard (the padded sequence / CP: what attention and the column-parallel
outputs see), ``s`` rows of the residual stream (``n/TP`` under SP, else ``n``); hidden size ``d``,
head dim ``Dh``, ``h`` = heads / TP. DiT, per block:

| layout | forward | backward |
| --- | --- | --- |
| TP | 2 all-reduce ``[n, d]`` (after ``proj``, ``fc2``) | 2 all-reduce ``[n, d]`` (input grads of ``qkv``, ``fc1``); QK-norm grads ``2·[Dh]`` |
| TP + SP | 2 all-gather + 2 reduce-scatter ``[n, d]`` | 4 all-gather + 2 reduce-scatter ``[n, d]``; grads of QK-norm, adaLN offset ``[6, d]``, row biases ``2·[d]`` |
| Ulysses | all-to-all ``[n, 3, h, Dh]`` (q, k, v), all-to-all ``[N, h/CP, Dh]`` | the same two, reversed |

Wan 2.1, per block (``M`` text-context rows: samples × ``wan.text_len``; ``L`` CLIP image rows, I2V):
its q, k, v, cross-attention q and first FFN linear are five column-parallel layers, ``to_out.0``
(twice) and ``ffn.net.2`` three row-parallel ones; the cross-attention's ``to_k``/``to_v`` (and
I2V's ``add_k_proj``/``add_v_proj``) read the whole context, never sequence-sharded.

| layout | forward | backward |
| --- | --- | --- |
| TP | 3 all-reduce ``[n, d]``; the norms across heads: all-reduce ``[rows, 1]`` fp32 for ``attn1`` q, k, ``attn2`` q (``n``), k (``M``), I2V image k (``L``) | 5 all-reduce ``[n, d]``, 2 ``[M, d]``, I2V 2 ``[L, d]``; the norms' all-reduces again |
| TP + SP | 5 all-gather + 3 reduce-scatter ``[n, d]``; the norms as TP | 8 all-gather + 5 reduce-scatter ``[n, d]``; the context's and norms' all-reduces as TP; grads of ``scale_shift_table`` ``[6, d]``, ``norm2`` ``2·[d]``, row biases ``3·[d]`` |
| Ulysses | around ``attn1`` only: all-to-all of q, k, v and of the output | the same two, reversed |

Outside the blocks (both): under SP the backward all-gathers the gradients of the embeddings and
the modulation (``[n, d]`` and ``[n, 6, d]``) and the forward all-gathers the blocks' output
``[n, d]``; under CP the forward all-gathers the model output ``[N, C·p]``. With activation
checkpointing every block's forward collectives run twice. HunyuanVideo has no communication plan
yet (:class:`PlanError`); its memory is estimated.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
FAMILIES = ("dit", "wan", "hunyuan_video")
COMMUNICATION_FAMILIES = ("dit", "wan")  # the families communication_plan derives
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
    family: str = "dit"
    mlp_hidden_size: int = 0  # 0: 4 × hidden_size
    in_features: int = 0  # the patch embedding's input, channel condition included (0: patch_features)
    qk_norm: bool = True
    text_dim: int = 0  # width of the text embeddings the model reads
    text_len: int = 0  # Wan: each sample's text context is zero-padded to this (0: unpadded)
    image_dim: int = 0  # Wan I2V: width of the CLIP image tokens (0: text-to-video)
    added_kv_dim: int = 0  # Wan I2V: input width of the image keys' and values' projections
    cross_attn_norm: bool = True  # Wan: a LayerNorm before the cross-attention
    freq_dim: int = 256  # sinusoidal timestep features
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
    def from_config(cls, cfg: Any) -> ModelShape:
        family = str(getattr(cfg, "family", "dit"))
        if family not in FAMILIES:
            raise PlanError(f"model.family '{family}' is not one the plan knows ({', '.join(FAMILIES)})")
        patch = math.prod(int(p) for p in cfg.patch_size)
        lora = getattr(cfg, "lora", None)
        common: dict[str, Any] = {
            "lora_rank": int(lora.rank) if lora is not None else 0,
            "lora_dropout": float(lora.dropout) if lora is not None else 0.0,
            "lora_trainable": lora is not None and bool(list(lora.trainable)),
            "hidden_size": int(cfg.hidden_size),
            "num_heads": int(cfg.num_heads),
            "depth": int(cfg.depth),
            "family": family,
            "mlp_hidden_size": int(cfg.mlp_hidden_size),
            "in_features": int(cfg.in_channels) * patch,
            "qk_norm": bool(cfg.qk_norm),
            "text_dim": int(cfg.text_dim),
        }
        if family == "wan":
            wan = cfg.wan
            return cls(
                patch_features=int(wan.out_channels) * patch,
                text_len=int(wan.text_len),
                image_dim=int(wan.image_dim),
                added_kv_dim=int(wan.added_kv_proj_dim),
                cross_attn_norm=bool(wan.cross_attn_norm),
                freq_dim=int(wan.freq_dim),
                **common,
            )
        if family == "hunyuan_video":
            hv = cfg.hunyuan_video
            return cls(
                patch_features=int(hv.out_channels) * patch,
                single_blocks=int(hv.num_single_layers),
                refiner_blocks=int(hv.num_refiner_layers),
                pooled_dim=int(hv.pooled_projection_dim),
                guidance=bool(hv.guidance_embeds),
                **common,
            )
        return cls(patch_features=int(cfg.in_channels) * patch, **common)

    def context_rows(self, batch: MicroBatch) -> int:
        """Wan: rows of the cross-attention's text context (each sample padded to ``text_len``)."""
        return batch.samples * self.text_len if self.text_len else batch.text_tokens


@dataclass(frozen=True)
class MicroBatch:
    """One packed micro-batch, in rows; counts are over all its samples."""

    tokens: int  # visual (patch) tokens
    text_tokens: int = 0  # the DiT packs them into its sequence; Wan and HunyuanVideo keep them apart
    samples: int = 1
    image_tokens: int = 0  # Wan I2V: CLIP image tokens (257 per sample)

    def sequence(self, model: ModelShape) -> int:
        """Rows of the stream the blocks run: the DiT's whole packed sequence, the others' visual rows."""
        return self.tokens + self.text_tokens if model.family == "dit" else self.tokens


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


# ---------------------------------------------------------------------------- communication
def communication_plan(
    model: ModelShape, batch: MicroBatch, layout: Layout, element_bytes: int = 4
) -> list[Collective]:
    """Every collective of one forward + backward pass of the parallel model (module docstring)."""
    if layout.tensor == 1 and layout.context == 1:
        return []  # one rank holds the whole model and sequence: nothing to exchange inside it
    if model.family not in COMMUNICATION_FAMILIES:
        raise PlanError(
            f"no communication plan for model family '{model.family}' yet (the plan knows "
            f"{', '.join(COMMUNICATION_FAMILIES)}); its memory estimate needs none"
        )
    if model.adapters and layout.tensor > 1:
        raise PlanError("model.lora is set: the adapters' own collectives under TP are not in the plan yet")
    rows = Shards.of(batch.sequence(model), layout)
    calls = _Calls(model, layout, element_bytes)
    if layout.tensor > 1:
        if model.family == "dit":
            _dit_tensor_parallel(calls, model, rows.sequence)
        else:
            _wan_tensor_parallel(calls, model, rows.sequence, model.context_rows(batch), batch.image_tokens)
        if layout.sequence_parallel:
            n, d = rows.sequence, model.hidden_size
            calls.add("embeddings", "all_gather", "tp", n * d, "backward", 1)
            calls.add("modulation", "all_gather", "tp", n * 6 * d, "backward", 1)
            calls.add("blocks_output", "all_gather", "tp", n * d, "forward", 1)
    if layout.context > 1:
        n, head_dim = rows.sequence, model.head_dim
        heads = model.num_heads // layout.tensor  # heads of one TP rank
        where = "block" if model.family == "dit" else "block.attn1"
        for phase in ("forward", "backward"):
            calls.add(f"{where}.ulysses_qkv", "all_to_all", "cp", n * 3 * heads * head_dim, phase)
            calls.add(f"{where}.ulysses_out", "all_to_all", "cp", n * heads * head_dim, phase)
        calls.add("outputs", "all_gather", "cp", rows.total * model.patch_features, "forward", 1)
    return calls.plan


class _Calls:
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


def _dit_tensor_parallel(calls: _Calls, model: ModelShape, n: int) -> None:
    d = model.hidden_size
    calls.columns(("block.qkv", "block.fc1"), n * d)
    calls.rows(("block.proj", "block.fc2"), n * d)
    grads = [("block.qk_norm", model.head_dim)] * (2 if model.qk_norm else 0)
    if calls.layout.sequence_parallel:
        grads += [("block.modulation", 6 * d)] + [("block.row_bias", d)] * 2
    calls.summed_gradients(grads)


def _wan_tensor_parallel(calls: _Calls, model: ModelShape, n: int, context: int, image: int) -> None:
    d = model.hidden_size
    image = image if model.image_dim else 0
    calls.columns(
        (
            "block.attn1.to_q",
            "block.attn1.to_k",
            "block.attn1.to_v",
            "block.attn2.to_q",
            "block.ffn.net.0.proj",
        ),
        n * d,
    )
    calls.rows(("block.attn1.to_out.0", "block.attn2.to_out.0", "block.ffn.net.2"), n * d)
    # The cross-attention's keys and values read the context, whole on every rank: TP all-reduces
    # the gradient of their input, with or without SP.
    whole = [("block.attn2.to_k", context * d), ("block.attn2.to_v", context * d)]
    if image:
        whole += [
            (f"block.attn2.{name}", image * model.added_kv_dim) for name in ("add_k_proj", "add_v_proj")
        ]
    for where, numel in whole:
        calls.add(where, "all_reduce", "tp", numel, "backward")
    # RMSNorm across all heads (HeadShardedRMSNorm): the fp32 sums of squares [rows, 1] are summed
    # over TP in the forward pass, and their gradients in the backward pass (SumOverRanks).
    norms = [("block.attn1.norm_q", n), ("block.attn1.norm_k", n), ("block.attn2.norm_q", n)]
    norms += [("block.attn2.norm_k", context)] + ([("block.attn2.norm_added_k", image)] if image else [])
    for where, rows in norms:
        for phase in ("forward", "backward"):
            calls.add(where, "all_reduce", "tp", rows, phase, element_bytes=FP32)
    if calls.layout.sequence_parallel:
        grads = [("block.scale_shift_table", 6 * d)]
        grads += [("block.norm2", d)] * (2 if model.cross_attn_norm else 0)  # weight and bias
        grads += [("block.row_bias", d)] * 3  # to_out.0 (twice) and ffn.net.2: added after the reduce-scatter
        calls.summed_gradients(grads)


def bytes_by_op(plan: list[Collective]) -> dict[str, int]:
    """Logical bytes per operation over the whole plan."""
    totals: dict[str, int] = defaultdict(int)
    for item in plan:
        totals[item.op] += item.bytes
    return dict(totals)


def calls_by_op(plan: list[Collective]) -> dict[str, Counter[int]]:
    """Per operation, how many calls of each logical size (bytes) the plan makes."""
    calls: dict[str, Counter[int]] = defaultdict(Counter)
    for item in plan:
        calls[item.op][item.numel * item.element_bytes] += item.count
    return dict(calls)


# ------------------------------------------------------------------------------------ counting
@dataclass
class CollectiveCount:
    """Logical bytes and calls per operation, as counted by :func:`count_collectives`."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sizes: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))  # op: bytes per call

    def add(self, op: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes[op] += nbytes
        self.calls[op] += 1
        self.sizes[op][nbytes] += 1


# Modules that keep their own reference to torch's all-gather / reduce-scatter functions.
_MEGATRON_ALIASES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers")


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """Counts every all-reduce, all-gather, reduce-scatter and all-to-all made inside the block.

    Wraps ``torch.distributed``'s functions (and megatron-core's aliases of them) for the
    duration of the ``with`` block only, and restores them on exit.
    """
    count = CollectiveCount()
    originals: dict[str, Any] = {
        "all_reduce": dist.all_reduce,
        "all_gather_into_tensor": dist.all_gather_into_tensor,
        "reduce_scatter_tensor": dist.reduce_scatter_tensor,
        "all_to_all_single": dist.all_to_all_single,
    }

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        count.add("all_reduce", tensor)
        return originals["all_reduce"](tensor, *args, **kwargs)

    def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        count.add("all_gather", output)
        return originals["all_gather_into_tensor"](output, input, *args, **kwargs)

    def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        count.add("reduce_scatter", input)
        return originals["reduce_scatter_tensor"](output, input, *args, **kwargs)

    def all_to_all_single(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        count.add("all_to_all", input)
        return originals["all_to_all_single"](output, input, *args, **kwargs)

    wrappers = {
        "all_reduce": all_reduce,
        "all_gather_into_tensor": all_gather_into_tensor,
        "reduce_scatter_tensor": reduce_scatter_tensor,
        "all_to_all_single": all_to_all_single,
    }
    aliases = {
        "dist_all_gather_func": all_gather_into_tensor,
        "dist_reduce_scatter_func": reduce_scatter_tensor,
    }
    patched: list[tuple[Any, str, Any]] = []
    for name, wrapper in wrappers.items():
        patched.append((dist, name, getattr(dist, name)))
        setattr(dist, name, wrapper)
    for module_name in _MEGATRON_ALIASES:
        module = importlib.import_module(module_name)
        for name, wrapper in aliases.items():
            if hasattr(module, name):
                patched.append((module, name, getattr(module, name)))
                setattr(module, name, wrapper)
    try:
        yield count
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


@dataclass
class SavedTensorCount:
    """The storages autograd saved for backward: bytes, and the scopes each was saved in."""

    storages: dict[int, tuple[int, set[str]]] = field(default_factory=dict)  # data_ptr: (bytes, scopes)

    def by_scope(self) -> dict[str, int]:
        """Bytes per scope; a storage saved in several scopes, or outside every one, is ``outside``."""
        totals: dict[str, int] = defaultdict(int)
        for nbytes, scopes in self.storages.values():
            totals[next(iter(scopes)) if len(scopes) == 1 else "outside"] += nbytes
        return dict(totals)


@contextlib.contextmanager
def count_saved_tensors(
    model: nn.Module, scopes: Mapping[str, nn.Module], exclude: Iterable[torch.Tensor] = ()
) -> Iterator[SavedTensorCount]:
    """Counts the floating-point storages autograd saves inside the ``with`` block, once each.

    ``scopes``: modules (blocks) whose forward passes the saved tensors are attributed to; a
    storage saved outside all of them, or in several, is ``outside``. Storages of the model's
    parameters and of ``exclude`` (the batch's own tensors) are not counted, nor integer tensors
    (positions, row indices). The saved tensors are referenced until the block ends, so that no
    freed address is reused for another.
    """
    count = SavedTensorCount()
    current = ["outside"]
    keep: list[torch.Tensor] = []
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in exclude}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        keep.append(tensor)
        storage = tensor.untyped_storage()
        if tensor.is_floating_point() and storage.data_ptr() not in skip:
            nbytes, seen = count.storages.setdefault(storage.data_ptr(), (storage.nbytes(), set()))
            seen.add(current[-1])
        return tensor

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            current.append(name)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        current.pop()

    handles = []
    for name, module in scopes.items():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield count
    finally:
        for handle in handles:
            handle.remove()


# -------------------------------------------------------------------------------------- memory
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


def parameter_census(model: nn.Module, layout: Layout) -> ParameterCensus:
    """Count ``model``'s parameters (built with ``device="meta"``) as ``layout`` stores them.

    TP slices come from :func:`imontage.parallel.parallelize.tensor_split` (the tables that cut the
    weights); a TP layout the model cannot take is refused with ``check_layout``'s message. Trainable
    means ``requires_grad``: a model whose base weights are frozen (adapters) counts only the
    adapters' gradients and optimiser state.
    """
    from imontage.parallel.parallelize import check_layout, family_plan, tensor_split

    plan = None
    if layout.tensor > 1:  # the TP cuts are the family's parallel plan's (refused for a family without one)
        check_layout(model, layout.tensor, layout.context)
        plan = family_plan(model)
    shares: dict[str, int] = {}
    trainable = frozen = rank_trainable = 0
    for name, param in model.named_parameters():
        split = tensor_split(name, plan) if plan is not None and layout.tensor > 1 else None
        share = param.numel()
        if split is not None:
            try:
                share = split.shard(torch.empty(param.shape, device="meta"), 0, layout.tensor).numel()
            except ValueError as error:
                raise PlanError(f"{name} {tuple(param.shape)}: {error}") from None
        shares[name] = share
        partition = -(-share // layout.zero)  # DeepSpeed pads each parameter's partitions equally
        if param.requires_grad:
            trainable += partition
            rank_trainable += share
        else:
            frozen += partition
    return ParameterCensus(
        model=sum(p.numel() for p in model.parameters()),
        rank=sum(shares.values()),
        rank_trainable=rank_trainable,
        trainable=trainable,
        frozen=frozen,
        block=_bucket_block(model, shares),
    )


def _bucket_block(model: nn.Module, shares: Mapping[str, int]) -> int:
    """``engine.block_numel`` on one rank's shares: the largest transformer block (of every list
    the family's plan names: HunyuanVideo has two), or the whole model when it has none."""
    from imontage.parallel.parallelize import family_plan

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


class _Kept:
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


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, element_bytes: int) -> Activations:
    """What autograd keeps, per rank, for one micro-batch (the terms are listed in each family's
    function; :func:`estimate_memory` says what is not counted).

    Assumes the GPU kernels: flash attention keeps q, k, v, its output and the fp32 log-sum-exp
    ``[h, n]``; the fused RoPE keeps only the positions and the fused QK-norm + RoPE its q and k
    inputs; RMSNorm (the fused CUDA kernel) its input and the fp32 rstd; LayerNorm its input and
    fp32 mean and rstd. Integer tensors (positions, row indices: ≤ 24 bytes a token) are not counted.
    """
    build = {"dit": _dit_activations, "wan": _wan_activations, "hunyuan_video": _hunyuan_activations}
    if model.adapters:
        _check_lora_modelled(model, layout)
        return _with_adapters(build[model.family](model, batch, layout, element_bytes), model, batch, layout)
    return build[model.family](model, batch, layout, element_bytes)


# ----------------------------------------------------------------------------- LoRA activations
# The linears of one block that model.lora must adapt for the estimate to hold (every linear of the
# blocks' attention and FFN, as docs/lora.md's recipe does); Wan I2V adds the image keys' and values'.
LORA_BLOCK_LINEARS = {
    "dit": ("qkv", "proj", "fc1", "fc2"),
    "wan": tuple(f"attn{i}.to_{x}" for i in (1, 2) for x in ("q", "k", "v", "out.0"))
    + ("ffn.net.0.proj", "ffn.net.2"),
}
LORA_IMAGE_LINEARS = ("attn2.add_k_proj", "attn2.add_v_proj")
# What a frozen base no longer keeps, per family (names of the full fine-tuning lists): a linear
# whose weight needs no gradient does not save its input (PyTorch saves mm's ``self`` only for the
# weight's gradient); a product with a frozen modulation keeps the modulation for the other
# factor's gradient but not that factor (norm.out · (1 + scale), the gated outputs).
_LORA_DROPPED = {
    "dit": ("norm1.out", "proj.out", "norm2.out", "fc2.out"),
    "wan": ("norm1.out", "attn1.to_out.out", "norm3.out", "ffn.out", "ffn.out.float"),
}
# Block 0 reads the frozen embeddings: its input needs no gradient, so norm1 keeps nothing, nor
# does its modulation product (neither factor needs a gradient).
_LORA_FIRST_DROPPED = ("x", "x.float", "norm1.stats", "norm1.scale")
# Outside the blocks every embedding is frozen and its input needs no gradient: nothing is kept but
# the output layer's norm (for its input's gradient), the scale it is multiplied by, and the text
# context the cross-attention keys' and values' adapters read in every block (Wan).
_LORA_OUTSIDE = {
    "dit": ("final.x", "final.norm.stats", "final.scale"),
    "wan": ("text.context", "image.context", "head.x", "head.x.float", "head.norm.stats", "head.scale"),
}


def _check_lora_modelled(model: ModelShape, layout: Layout) -> None:
    """Refuse the ``model.lora`` cases whose activations are not modelled (and measured)."""
    what = None
    if model.lora_trainable:
        what = "model.lora.trainable (parameters trained beside the adapters)"
    elif model.lora_rank == 0:
        what = "model.lora without adapters"
    elif model.family not in LORA_BLOCK_LINEARS:
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
    """The linears of one block the modelled ``model.lora`` adapts (:data:`LORA_BLOCK_LINEARS`)."""
    return LORA_BLOCK_LINEARS[model.family] + (LORA_IMAGE_LINEARS if model.image_dim else ())


def _with_adapters(full: Activations, model: ModelShape, batch: MicroBatch, layout: Layout) -> Activations:
    """What autograd keeps with the base frozen and adapters on :func:`lora_block_linears`: the full
    fine-tuning lists less what only the frozen weights' gradients needed, plus each adapter's
    ``h = A x`` ``[rows, rank]`` (B's input; A's input ``x`` is the layer's, kept already)."""
    (block,) = full.blocks
    e = block.inputs[0].element_bytes
    n, r = Shards.of(batch.sequence(model), layout).sequence, model.lora_rank
    rows = dict.fromkeys(lora_block_linears(model), n)
    if model.family == "wan":
        image = batch.image_tokens if model.image_dim else 0
        context = model.context_rows(batch)
        rows |= {"attn2.to_k": context, "attn2.to_v": context}
        rows |= dict.fromkeys(LORA_IMAGE_LINEARS, image) if model.image_dim else {}
    adapters = tuple(Saved(f"{name}.lora_h", count, r, e) for name, count in rows.items() if count)
    saved = tuple(s for s in block.saved if s.name not in _LORA_DROPPED[model.family]) + adapters
    first = tuple(s for s in saved if s.name not in _LORA_FIRST_DROPPED)
    blocks = (BlockActivations(block.name, block.count, saved, block.inputs, first),)
    outside = tuple(s for s in full.outside if s.name in _LORA_OUTSIDE[model.family])
    return Activations(blocks, outside, full.shared_inputs, full.checkpointing, full.first_block_view)


def _dims(model: ModelShape, layout: Layout) -> tuple[int, int, int, int]:
    """Hidden size, and one TP rank's attention width, heads and MLP width."""
    t = layout.tensor
    return model.hidden_size, model.hidden_size // t, model.num_heads // t, model.mlp // t


def _self_attention(k: _Kept, prefix: str, n: int, a: int, h: int, context: int, v: str) -> None:
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


def _dit_activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    rows = Shards.of(batch.sequence(model), layout)
    n, s = rows.sequence, rows.residual
    d, a, h, f = _dims(model, layout)
    k = _Kept(e)
    k.add("table", s, 6 * d)  # the modulation plus the block's offset: the gates keep it
    for norm, x in (("norm1", "x"), ("norm2", "x2")):  # x: the block's input; x2 after attention
        k.add(x, s, d)
        k.stats(norm, s)
        k.add(f"{norm}.out", s, d)
        k.add(f"{norm}.scale", s, d)  # 1 + scale
    k.add("qkv.in", s, d)  # under SP this rank's shard: the column-parallel layer gathers it again
    k.add("qkv.out", n, 3 * a)  # q and k kept by the fused QK-norm + RoPE kernel, v (a view) by attention
    _self_attention(k, "attn", n, a, h, layout.context, v="qkv.out")
    k.add("proj.out", s, d)
    k.add("fc1.in", s, d)
    k.add("fc1.out", n, f)
    k.add("fc2.in", n, f)
    k.add("fc2.out", s, d)
    block = BlockActivations("blocks", model.depth, k.saved(), (Saved("x", s, d, e),))
    o = _Kept(e)  # on the CP shard's n rows, before SP shards them
    o.add("patch_embed.in", n, model.in_features)
    o.add("text_proj.in", n, model.text_dim)  # the text path runs on every row
    for name in ("text_proj.hidden", "text_proj.act", "time.hidden", "time.act", "t_emb", "t_emb.silu"):
        o.add(name, n, d)
    o.add("time.freq", n, 256)
    o.add("final.silu", n, d)
    o.add("final.x", n, d)
    o.stats("final.norm", n)
    for name in ("final.norm.out", "final.scale", "final.linear.in"):
        o.add(name, n, d)
    # The checkpoints share the modulation: under SP a slice that keeps all n rows. Block 0 keeps
    # its input x (LayerNorm's input) whether checkpointed or not.
    shared = (Saved("modulation", n, 6 * d, e),)
    view = (Saved("x.unsharded", n - s, d, e),) if n > s else ()
    return Activations((block,), o.saved(), shared, layout.activation_checkpointing, view)


def _wan_norm(k: _Kept, name: str, rows: int, a: int, tensor: int) -> None:
    """Wan's q/k RMSNorm across heads on ``rows``: nn.RMSNorm on one rank, HeadShardedRMSNorm under TP."""
    if tensor == 1:
        k.add(f"{name}.in", rows, a)
        k.add(f"{name}.rstd", rows, 1, FP32)
        return
    k.float32(f"{name}.in", rows, a)  # x.float(), squared
    k.add(f"{name}.in" if k.e == FP32 else f"{name}.in.float2", rows, a, FP32)  # x.float() again, scaled
    k.add(f"{name}.rsqrt", rows, 1, FP32)
    k.add(f"{name}.normed", rows, a)  # cast back, times the weight


def _wan_activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    rows = Shards.of(batch.tokens, layout)
    n, s, t = rows.sequence, rows.residual, layout.tensor
    d, a, h, f = _dims(model, layout)
    context = model.context_rows(batch)
    image = batch.image_tokens if model.image_dim else 0
    k = _Kept(e)
    k.add("table", s, 6 * d, FP32)  # scale_shift_table + modulation in fp32: the gates keep it
    for norm, x, into in (("norm1", "x", "attn1.in"), ("norm3", "x3", "ffn.in")):  # modulated, fp32
        k.float32(x, s, d)
        k.stats(norm, s)
        k.add(f"{norm}.out", s, d, FP32)
        k.add(f"{norm}.scale", s, d, FP32)  # 1 + scale
        k.add(into, s, d)  # cast back: the column-parallel layers' input (under SP this rank's shard)
    # self-attention
    _wan_norm(k, "attn1.norm_q", n, a, t)
    _wan_norm(k, "attn1.norm_k", n, a, t)
    _self_attention(k, "attn1", n, a, h, layout.context, v="attn1.v")  # q, k rotated by the kernel
    k.add("attn1.to_out.out", s, d)  # gated
    # cross-attention, on the rank's own queries, against the whole context
    if model.cross_attn_norm:
        k.float32("x2", s, d)
        k.stats("norm2", s)
        if e != FP32:
            k.add("norm2.params.float", 1, 2 * d, FP32)  # weight.float(), bias.float()
        k.add("attn2.in", s, d)
    else:
        k.add("x2" if e == FP32 else "attn2.in", s, d)
    for name, kv_rows in (("attn2", context), ("attn2.image", image)):
        _wan_norm(k, f"{name}.norm_k", kv_rows, a, t)
        k.add(f"{name}.k", kv_rows, a)
        k.add(f"{name}.v", kv_rows, a)
        k.add(f"{name}.out", n if kv_rows else 0, a)
        k.add(f"{name}.lse", n if kv_rows else 0, h, FP32)
    _wan_norm(k, "attn2.norm_q", n, a, t)
    k.add("attn2.q", n, a)
    k.add("attn2.out_sum" if image else "attn2.out", n, a)  # the output projection's input
    # feed-forward
    k.add("ffn.hidden", n, f)  # GELU's input
    k.add("ffn.act", n, f)
    k.float32("ffn.out", s, d)  # gated in fp32
    block = BlockActivations("blocks", model.depth, k.saved(), (Saved("x", s, d, e),))
    o = _Kept(e)  # the CP shard's n visual rows, before SP shards them
    o.add("patch_embedding.in", n, model.in_features)
    o.add("time.freq", n, model.freq_dim)
    for name in ("time.hidden", "time.act", "temb", "temb.silu"):
        o.add(name, n, d)
    o.add("text.in", context, model.text_dim)
    for name in ("text.hidden", "text.act", "text.context"):  # the context every block reads
        o.add(name, context, d)
    if image:
        for name, width in (("image.norm1", model.image_dim), ("image.norm2", d)):
            o.float32(f"{name}.in", image, width)
            o.stats(name, image)
            if e != FP32:
                o.add(f"{name}.params.float", 1, 2 * width, FP32)
        for name in ("image.ff.in", "image.ff.hidden", "image.ff.act"):
            o.add(name, image, model.image_dim)
        o.add("image.context", image, d)  # what add_k_proj and add_v_proj read
    o.float32("head.x", n, d)
    o.stats("head.norm", n)
    o.add("head.norm.out", n, d, FP32)
    o.add("head.scale", n, d, FP32)
    o.add("head.proj_out.in", n, d)
    shared = (Saved("modulation", n, 6 * d, e),)  # under SP a slice that keeps all n rows
    # Block 0 keeps its input when checkpointed, or in fp32 (norm1's input is then x itself).
    kept_input = layout.activation_checkpointing or e == FP32
    view = (Saved("x.unsharded", n - s, d, e),) if kept_input and n > s else ()
    return Activations((block,), o.saved(), shared, layout.activation_checkpointing, view)


def _hunyuan_activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    """HunyuanVideo: a visual and a text stream, each sharded on its own; one modulation row per
    sample (``U = samples``: a sample denoised at one timestep; per-token timesteps add rows)."""
    visual, text = Shards.of(batch.tokens, layout), Shards.of(batch.text_tokens, layout)
    d, a, h, f = _dims(model, layout)
    samples = batch.samples
    joint = visual.sequence + text.sequence  # rows of the joint attention on this rank
    streams = (("img", visual), ("txt", text))

    def modulated(k: _Kept, stream: str, s: int, norm: str, into: str) -> None:
        k.add(f"{stream}.{norm}.x", s, d)
        k.stats(f"{stream}.{norm}", s)
        k.add(f"{stream}.{norm}.out", s, d)
        k.add(f"{stream}.{norm}.scale", s, d)
        k.add(into, s, d)

    def per_head_norms(k: _Kept, name: str, rows: int) -> None:
        k.add(f"{name}.in", rows, a)  # nn.RMSNorm per head (the text stream: not fused with RoPE)
        k.add(f"{name}.rstd", rows, h, FP32)

    def attention(k: _Kept) -> None:
        for name in ("q", "k", "v", "out"):  # gathered into per-sample order for flash attention
            k.add(f"joint.{name}", joint, a)
        k.add("joint.lse", joint, h, FP32)
        if model.qk_norm:
            k.add("img.q", visual.sequence, a)  # the fused QK-norm + RoPE kernel's inputs
            k.add("img.k", visual.sequence, a)

    dual = _Kept(e)
    dual.add("modulation.silu", samples, 2 * d)  # norm1's and norm1_context's SiLU of the table
    for stream, rows in streams:
        s, n = rows.residual, rows.sequence
        modulated(dual, stream, s, "norm1", f"{stream}.attn.in")
        modulated(dual, stream, s, "norm2", f"{stream}.ff.in")
        dual.add(f"{stream}.modulation", s, 6 * d)  # the gates keep the rows' 6 vectors
        dual.add(f"{stream}.attn.out", s, d)  # gated
        dual.add(f"{stream}.ff.hidden", n, f)
        dual.add(f"{stream}.ff.act", n, f)
        dual.add(f"{stream}.ff.out", s, d)
    per_head_norms(dual, "txt.norm_q", text.sequence)
    per_head_norms(dual, "txt.norm_k", text.sequence)
    attention(dual)
    dual.add("joint.out.streams", joint, a)  # back in stream order: both output projections' input
    single = _Kept(e)
    single.add("modulation.silu", samples, 2 * d)  # one SiLU of the table per stream
    for stream, rows in streams:
        s, n = rows.residual, rows.sequence
        modulated(single, stream, s, "norm", f"{stream}.in")
        single.add(f"{stream}.modulation", s, 3 * d)
        single.add(f"{stream}.mlp.hidden", n, f)  # GELU's input
        single.add(f"{stream}.proj_out.in", n, a + f)  # [attention | MLP]
        single.add(f"{stream}.proj_out.out", s, d)  # gated
    if model.qk_norm:
        per_head_norms(single, "txt.norm_q", text.sequence)
        per_head_norms(single, "txt.norm_k", text.sequence)
    attention(single)
    inputs = tuple(Saved(f"{stream}.x", rows.residual, d, e) for stream, rows in streams)
    blocks = (
        BlockActivations("transformer_blocks", model.depth, dual.saved(), inputs),
        BlockActivations("single_transformer_blocks", model.single_blocks, single.saved(), inputs),
    )
    o = _Kept(e)
    # Modulation rows: the timestep, pooled text and guidance embeddings, their sum (the table).
    o.add("cond.time.freq", samples, 256)
    o.add("cond.pooled.in", samples, model.pooled_dim)
    names = [
        "cond.time.hidden",
        "cond.time.act",
        "cond.pooled.hidden",
        "cond.pooled.act",
        "table",
        "final.silu",
    ]
    if model.guidance:
        o.add("cond.guidance.freq", samples, 256)
        o.add("cond.guidance.mask", samples, 1)
        names += ["cond.guidance.hidden", "cond.guidance.act"]
    for name in names:
        o.add(name, samples, d)
    o.add("x_embedder.in", visual.sequence, model.in_features)
    # The token refiner: every text row, whole on every rank, per sample (timestep + mean text).
    rows_t = batch.text_tokens
    o.add("refiner.time.freq", samples, 256)
    o.add("refiner.pooled.in", samples, model.text_dim)
    for name in (
        "refiner.time.hidden",
        "refiner.time.act",
        "refiner.pooled.hidden",
        "refiner.pooled.act",
        "refiner.table",
    ):
        o.add(name, samples, d)
    o.add("refiner.proj_in.in", rows_t, model.text_dim)
    for i in range(model.refiner_blocks):
        r = f"refiner.{i}"
        o.add(f"{r}.table.silu", samples, d)
        for norm in ("norm1", "norm2"):
            o.add(f"{r}.{norm}.x", rows_t, d)
            o.stats(f"{r}.{norm}", rows_t)
            o.add(f"{r}.{norm}.out", rows_t, d)
        for name in ("q", "k", "v", "out", "to_out.out", "ff.out"):
            o.add(f"{r}.{name}", rows_t, d)
        o.add(f"{r}.lse", rows_t, model.num_heads, FP32)
        o.add(f"{r}.gates", rows_t, 2 * d)
        o.add(f"{r}.ff.hidden", rows_t, 4 * d)
        o.add(f"{r}.ff.act", rows_t, 4 * d)
    o.add("final.x", visual.sequence, d)
    o.stats("final.norm", visual.sequence)
    for name in ("final.norm.out", "final.scale", "final.proj_out.in"):
        o.add(name, visual.sequence, d)
    # The first dual block keeps both streams' inputs (their LayerNorms' inputs, or its checkpoint):
    # its visual rows slice the CP shard's embeddings, its text rows the whole text stream (the
    # refiner runs whole on every rank; its CP and SP shards are slices).
    whole = {"img": visual.sequence, "txt": text.total}
    view = tuple(
        Saved(f"{stream}.x.unsharded", whole[stream] - r.residual, d, e)
        for stream, r in streams
        if whole[stream] > r.residual
    )
    return Activations(blocks, o.saved(), (), layout.activation_checkpointing, view)


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
        gathered = min(MAX_LIVE_BLOCKS * c.block, c.rank)
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
    if model.adapters and model.lora_rank > 0 and model.family in LORA_BLOCK_LINEARS:
        _check_lora_targets(module, model)
    census = parameter_census(module, layout)
    kept = activations(model, batch, layout, precision.activation_bytes)
    return MemoryEstimate(census, layout, precision, kept, ema)


def _check_lora_targets(module: nn.Module, model: ModelShape) -> None:
    """The adapters ``module`` carries must be the modelled ones (:func:`lora_block_linears`)."""
    from imontage.models.lora import adapted_modules

    adapted = {name for name, _ in adapted_modules(module)}
    modelled = {f"blocks.{i}.{leaf}" for i in range(model.depth) for leaf in lora_block_linears(model)}
    if adapted != modelled:
        odd = sorted(adapted - modelled) or sorted(modelled - adapted)
        raise PlanError(
            f"model.lora.targets: the activation estimate models adapters on every attention and FFN "
            f"linear of the blocks ({', '.join(f'blocks.*.{leaf}' for leaf in lora_block_linears(model))}) "
            f"and no other; these targets {'also adapt' if adapted - modelled else 'leave out'} {odd[0]}"
        )


def zero3_traffic(census: ParameterCensus, layout: Layout, precision: Precision) -> dict[str, float]:
    """Bytes one rank sends in ZeRO-3's own collectives per micro-batch, with ring algorithms.

    Each parameter is all-gathered for the forward pass and again for the backward pass (the
    recompute under activation checkpointing reuses the backward's gather), and each trainable
    parameter's gradient is reduce-scattered once. Not part of :func:`communication_plan` (its calls depend on the buckets).
    """
    share = (layout.zero - 1) / layout.zero
    return {
        "all_gather": 2 * census.rank * precision.parameter_bytes * share,
        "reduce_scatter": census.rank_trainable * precision.gradient_bytes * share,
    }


# ------------------------------------------------------------------------------------ printing
def format_plan(plan: list[Collective]) -> str:
    """A table of the plan: one row per kind of collective, then totals per operation."""
    header = (
        f"{'where':<24} {'op':<15} {'group':<6} {'phase':<9} {'calls':>6} {'MiB/call':>10} "
        f"{'MiB (logical)':>14} {'MiB/rank wire':>14}"
    )
    lines = [header, "-" * len(header)]
    for item in plan:
        lines.append(
            f"{item.where:<24} {item.op:<15} {item.group}{item.group_size:<4} {item.phase:<9} {item.count:>6} "
            f"{item.numel * item.element_bytes / 2**20:>10.3f} {item.bytes / 2**20:>14.2f} {item.wire_bytes / 2**20:>14.2f}"
        )
    lines.append("-" * len(header))
    for op, total in sorted(bytes_by_op(plan).items()):
        wire = sum(item.wire_bytes for item in plan if item.op == op)
        lines.append(
            f"{'total':<24} {op:<15} {'':<6} {'':<9} {'':>6} {'':>10} {total / 2**20:>14.2f} {wire / 2**20:>14.2f}"
        )
    return "\n".join(lines)


def format_memory(estimate: MemoryEstimate) -> str:
    """A table of the estimate's terms in GiB, and how the activations add up."""
    c, kept = estimate.census, estimate.activations
    lines = [
        f"parameters: {c.model / 1e9:.3f}e9 in the model, {c.rank / 1e9:.3f}e9 per TP rank, "
        f"ZeRO-3 partition {(c.trainable + c.frozen) / 1e9:.3f}e9 ({c.frozen / 1e9:.3f}e9 frozen), "
        f"largest block {c.block / 1e6:.1f}e6",
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

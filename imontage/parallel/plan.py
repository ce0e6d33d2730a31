"""Communication accounting: the collectives one training step of a parallel DiT makes, and a counter.

:func:`communication_plan` derives, from the model shape, the packed sequence length and the
layout, every collective of one forward + backward pass of the parallel model (ZeRO's own
parameter gathers and gradient reductions are not included: they depend on the engine's bucket
settings, not on the layout). :func:`count_collectives` counts the ones a real step makes, so a
test can hold the plan to the truth.

Sizes are *logical*: the whole tensor an operation produces or consumes (an all-gather's output,
a reduce-scatter's input, an all-reduce's or all-to-all's buffer). What one rank puts on the wire
with ring algorithms follows from it: ``2(p−1)/p`` of it for an all-reduce, ``(p−1)/p`` for the
other three.

Per block, with ``n`` tokens per CP shard (``N/CP``), hidden size ``d`` and head dim ``Dh``:

| layout | forward | backward |
| --- | --- | --- |
| TP | 2 all-reduce ``[n, d]`` (after ``proj``, ``fc2``) | 2 all-reduce ``[n, d]`` (input grads of ``qkv``, ``fc1``); QK-norm grads ``2·[Dh]`` |
| TP + SP | 2 all-gather + 2 reduce-scatter ``[n, d]`` | 4 all-gather + 2 reduce-scatter ``[n, d]``; grads of QK-norm, adaLN offset ``[6, d]``, row biases ``2·[d]`` |
| Ulysses | all-to-all ``[n, 3, h, Dh]`` (q, k, v), all-to-all ``[N, h/CP, Dh]`` | the same two, reversed |

Outside the blocks: under SP the backward all-gathers the gradients of the embeddings and the
modulation (``[n, d]`` and ``[n, 6, d]``) and the forward all-gathers the blocks' output
``[n, d]``; under CP the forward all-gathers the model output ``[N, C·p]``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


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
    """What the plan needs of a model configuration."""

    hidden_size: int
    num_heads: int
    depth: int
    patch_features: int  # C·pt·ph·pw
    qk_norm: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        return cls(
            hidden_size=int(cfg.hidden_size),
            num_heads=int(cfg.num_heads),
            depth=int(cfg.depth),
            patch_features=int(cfg.in_channels) * math.prod(int(p) for p in cfg.patch_size),
            qk_norm=bool(cfg.qk_norm),
        )


def padded_tokens(tokens: int, tensor: int, context: int, sequence_parallel: bool) -> int:
    """The packed sequence length after padding to whole shards (``pad_packed_batch``)."""
    multiple = context * (tensor if sequence_parallel else 1)
    return tokens + (-tokens % multiple)


def communication_plan(
    model: ModelShape,
    tokens: int,
    tensor: int = 1,
    context: int = 1,
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
    element_bytes: int = 4,
) -> list[Collective]:
    """Every collective of one forward + backward pass of the parallel DiT (module docstring)."""
    d, depth = model.hidden_size, model.depth
    head_dim = d // model.num_heads
    total = padded_tokens(tokens, tensor, context, sequence_parallel)
    n = total // context  # tokens of one CP shard
    heads = model.num_heads // tensor  # heads of one TP rank
    # With activation checkpointing the backward pass runs each block's forward again.
    block_forwards = 2 if activation_checkpointing else 1

    def c(where: str, op: str, group: str, numel: int, phase: str, count: int = depth) -> Collective:
        size = tensor if group == "tp" else context
        if phase == "forward":
            count *= block_forwards if where.startswith("block.") else 1
        return Collective(where, op, group, size, numel, element_bytes, phase, count)

    plan: list[Collective] = []
    if tensor > 1:
        replicated = [("block.qk_norm", head_dim, 2 if model.qk_norm else 0)]
        if sequence_parallel:
            for where in ("block.qkv", "block.fc1"):
                plan += [c(where, "all_gather", "tp", n * d, "forward"),
                         c(where, "all_gather", "tp", n * d, "backward"),  # the input again, for the weight grad
                         c(where, "reduce_scatter", "tp", n * d, "backward")]  # fmt: skip
            for where in ("block.proj", "block.fc2"):
                plan += [c(where, "reduce_scatter", "tp", n * d, "forward"),
                         c(where, "all_gather", "tp", n * d, "backward")]  # fmt: skip
            replicated += [("block.modulation", 6 * d, 1), ("block.row_bias", d, 2)]
            plan += [c("embeddings", "all_gather", "tp", n * d, "backward", 1),
                     c("modulation", "all_gather", "tp", n * 6 * d, "backward", 1),
                     c("blocks_output", "all_gather", "tp", n * d, "forward", 1)]  # fmt: skip
        else:
            plan += [c("block.proj", "all_reduce", "tp", n * d, "forward"),
                     c("block.fc2", "all_reduce", "tp", n * d, "forward"),
                     c("block.qkv", "all_reduce", "tp", n * d, "backward"),
                     c("block.fc1", "all_reduce", "tp", n * d, "backward")]  # fmt: skip
        plan += [
            c(where, "all_reduce", "tp", numel, "backward", depth * k) for where, numel, k in replicated if k
        ]
    if context > 1:
        for phase in ("forward", "backward"):
            plan += [c("block.ulysses_qkv", "all_to_all", "cp", n * 3 * heads * head_dim, phase),
                     c("block.ulysses_out", "all_to_all", "cp", n * heads * head_dim, phase)]  # fmt: skip
        plan.append(c("outputs", "all_gather", "cp", total * model.patch_features, "forward", 1))
    return plan


def bytes_by_op(plan: list[Collective]) -> dict[str, int]:
    """Logical bytes per operation over the whole plan."""
    totals: dict[str, int] = defaultdict(int)
    for item in plan:
        totals[item.op] += item.bytes
    return dict(totals)


# ------------------------------------------------------------------------------------ counting
@dataclass
class CollectiveCount:
    """Logical bytes and calls per operation, as counted by :func:`count_collectives`."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, tensor: torch.Tensor) -> None:
        self.bytes[op] += tensor.numel() * tensor.element_size()
        self.calls[op] += 1


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


def format_plan(plan: list[Collective]) -> str:
    """A table of the plan: one row per kind of collective, then totals per operation."""
    header = (
        f"{'where':<20} {'op':<15} {'group':<6} {'phase':<9} {'calls':>6} {'MiB/call':>10} "
        f"{'MiB (logical)':>14} {'MiB/rank wire':>14}"
    )
    lines = [header, "-" * len(header)]
    for item in plan:
        lines.append(
            f"{item.where:<20} {item.op:<15} {item.group}{item.group_size:<4} {item.phase:<9} {item.count:>6} "
            f"{item.numel * item.element_bytes / 2**20:>10.3f} {item.bytes / 2**20:>14.2f} {item.wire_bytes / 2**20:>14.2f}"
        )
    lines.append("-" * len(header))
    for op, total in sorted(bytes_by_op(plan).items()):
        wire = sum(item.wire_bytes for item in plan if item.op == op)
        lines.append(
            f"{'total':<20} {op:<15} {'':<6} {'':<9} {'':>6} {'':>10} {total / 2**20:>14.2f} {wire / 2**20:>14.2f}"
        )
    return "\n".join(lines)

"""Counters of what a real training step makes and keeps: its collectives and the tensors autograd
saves, so that tests hold the plan (:mod:`imontage.cost.communication`) and the activation
estimate (:mod:`imontage.cost.memory`) to the truth."""

from __future__ import annotations

import contextlib
import importlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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

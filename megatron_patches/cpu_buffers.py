"""Patch ``cpu_buffers``: megatron's tensor-parallel buffers are allocated on the CPU.

Sequence parallelism gathers and reduce-scatters activations into buffers that megatron-core
allocates with ``device=torch.cuda.current_device()`` (in ``GlobalMemoryBuffer.get_tensor`` and
in the sequence-parallel mappings and linear layers). On a CPU-only build that call raises. The
patch gives each of those modules a stand-in for ``torch`` whose ``cuda.current_device()`` is the
CPU; every other attribute is torch's own, so nothing else changes.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch

from megatron_patches.guard import require

# Modules whose buffers use torch.cuda.current_device().
TARGETS = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
)


class _CudaWithCpuDevice:
    """``torch.cuda`` with ``current_device()`` answering the CPU."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class TorchWithCpuDevice:
    """``torch`` as megatron's modules see it after the patch."""

    cuda = _CudaWithCpuDevice()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _modules() -> list[types.ModuleType]:
    modules = [importlib.import_module(name) for name in TARGETS]
    for module in modules:
        require(module, "torch")
    return modules


def apply() -> None:
    for module in _modules():
        if module.torch is torch:
            module.torch = TorchWithCpuDevice()  # type: ignore[attr-defined]


def revert() -> None:
    for module in _modules():
        if isinstance(module.torch, TorchWithCpuDevice):
            module.torch = torch  # type: ignore[attr-defined]

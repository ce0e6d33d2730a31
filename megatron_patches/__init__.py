"""Version-guarded patches that let megatron-core's tensor-parallel layers run on CPU with gloo.

megatron-core allocates its sequence-parallel buffers on ``torch.cuda.current_device()`` and keeps
its RNG tracker in CUDA generators, so on a CPU-only build sequence parallelism and
``model_parallel_cuda_manual_seed`` fail. The patches here give those code paths the CPU instead.

Nothing is patched on import. Call :func:`apply` (idempotent) in a process that trains on CPU;
GPU runs need none of this. Each patch has a test that fails without it.

    import megatron_patches
    megatron_patches.apply()                 # every patch
    megatron_patches.apply(["cpu_rng"])      # one of them
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from megatron_patches import cpu_buffers, cpu_rng
from megatron_patches.guard import check_version, megatron_version

PATCHES: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
    "cpu_buffers": (cpu_buffers.apply, cpu_buffers.revert),
    "cpu_rng": (cpu_rng.apply, cpu_rng.revert),
}
_applied: set[str] = set()


def apply(names: Iterable[str] | None = None) -> list[str]:
    """Apply the named patches (all by default); already applied ones are left as they are."""
    selected = list(PATCHES) if names is None else list(names)
    unknown = [name for name in selected if name not in PATCHES]
    if unknown:
        raise KeyError(f"unknown megatron patch(es) {unknown}; patches: {', '.join(PATCHES)}")
    check_version()
    for name in selected:
        if name not in _applied:
            PATCHES[name][0]()
            _applied.add(name)
    return sorted(_applied)


def revert(names: Iterable[str] | None = None) -> None:
    """Undo the named patches (all by default), restoring megatron-core's own code."""
    for name in list(PATCHES) if names is None else list(names):
        if name in _applied:
            PATCHES[name][1]()
            _applied.discard(name)


def applied() -> list[str]:
    return sorted(_applied)


__all__ = ["PATCHES", "applied", "apply", "check_version", "megatron_version", "revert"]

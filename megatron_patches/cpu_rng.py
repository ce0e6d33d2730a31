"""Patch ``cpu_rng``: megatron's RNG tracker and model-parallel seeding use the CPU generator.

megatron-core keeps named RNG states (data parallel, tensor-model parallel, expert parallel) in
CUDA generators and forks them around tensor-parallel regions. On a CPU-only build the seeding
call ``model_parallel_cuda_manual_seed`` raises. The patch swaps in a tracker that keeps the
same named states for the CPU generator, and a seeding function with megatron's seed scheme:
data parallel ``seed``, tensor-model parallel ``seed + 2718 + tp_rank``, expert parallel
``seed + 1024 + 100·ep_rank + etp_rank``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch

from megatron_patches.guard import require

RANDOM = "megatron.core.tensor_parallel.random"
PACKAGE = "megatron.core.tensor_parallel"
_originals: dict[str, Any] = {}


def _random() -> Any:
    module = importlib.import_module(RANDOM)
    require(
        module,
        "CudaRNGStatesTracker",
        "initialize_rng_tracker",
        "get_cuda_rng_tracker",
        "model_parallel_cuda_manual_seed",
        "_get_cuda_rng_state",
        "_set_cuda_rng_state",
        "_DATA_PARALLEL_RNG_TRACKER_NAME",
        "_MODEL_PARALLEL_RNG_TRACKER_NAME",
        "_EXPERT_PARALLEL_RNG_TRACKER_NAME",
    )
    return module


def _cpu_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """Named RNG states of the CPU generator, with megatron's tracker interface."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"RNG state '{name}' is already tracked")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = _random()._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            # Draws inside the block come from the named state; the caller's state is restored after.
            if name not in self.states_:
                raise KeyError(f"RNG state '{name}' is not tracked")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def model_parallel_cpu_manual_seed(
    seed: int,
    te_rng_tracker: bool = False,
    inference_rng_tracker: bool = False,
    use_cudagraphable_rng: bool = False,
    tp_rank: int | None = None,
    ep_rank: int | None = None,
    etp_rank: int | None = None,
    force_reset_rng: bool = False,
) -> None:
    """megatron's ``model_parallel_cuda_manual_seed`` for the CPU generator (same seeds, same names)."""
    from megatron.core import parallel_state

    if te_rng_tracker or use_cudagraphable_rng:
        raise ValueError("the CPU RNG tracker has no TransformerEngine or CUDA-graph variant")
    random = _random()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
    etp_rank = parallel_state.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
    random.initialize_rng_tracker(False, inference_rng_tracker, False, force_reset=force_reset_rng)
    tracker = random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def apply() -> None:
    random = _random()
    package: Any = importlib.import_module(PACKAGE)
    _originals.update(
        tracker=random.CudaRNGStatesTracker,
        seed=random.model_parallel_cuda_manual_seed,
        get_state=random._get_cuda_rng_state,
        set_state=random._set_cuda_rng_state,
    )
    random.CudaRNGStatesTracker = _cpu_tracker_class(_originals["tracker"])
    random.model_parallel_cuda_manual_seed = model_parallel_cpu_manual_seed
    package.model_parallel_cuda_manual_seed = model_parallel_cpu_manual_seed
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    random.initialize_rng_tracker(force_reset=True)  # a tracker made before the patch is CUDA's


def revert() -> None:
    if not _originals:
        return
    random = _random()
    package: Any = importlib.import_module(PACKAGE)
    random.CudaRNGStatesTracker = _originals["tracker"]
    random.model_parallel_cuda_manual_seed = _originals["seed"]
    package.model_parallel_cuda_manual_seed = _originals["seed"]
    random._get_cuda_rng_state = _originals["get_state"]
    random._set_cuda_rng_state = _originals["set_state"]
    random.initialize_rng_tracker(force_reset=True)
    _originals.clear()

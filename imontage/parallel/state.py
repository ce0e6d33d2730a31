"""Process groups from torchrun or SLURM environment variables, through megatron-core's parallel_state.

``world = DP × CP × TP`` with ranks ordered TP fastest, then CP (Ulysses), then DP: the ranks of
one tensor-parallel group are consecutive, so they share a node whenever TP <= GPUs per node.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04]``), expanded by ``scontrol show hostnames``."""
    result = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
    )
    hosts = result.stdout.split()
    if not hosts:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} printed no host")
    return hosts[0]


def _integer(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError as error:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from error


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun's variables when set (``RANK``, ``WORLD_SIZE``, ...), else SLURM's, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_integer(env, "RANK"),
            world_size=_integer(env, "WORLD_SIZE"),
            local_rank=_integer(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_integer(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
        # One port per job id, so two jobs sharing a node do not collide.
        port = (
            _integer(env, "MASTER_PORT")
            if "MASTER_PORT" in env
            else 20000 + _integer(env, "SLURM_JOB_ID") % 20000
        )
        return LaunchEnv(
            rank=_integer(env, "SLURM_PROCID"),
            world_size=_integer(env, "SLURM_NTASKS"),
            local_rank=_integer(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "single")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the three parallel dimensions; their product is the world size."""

    tensor: int = 1
    context: int = 1
    data: int = 1

    @classmethod
    def for_world(cls, world_size: int, tensor: int, context: int, num_heads: int) -> ParallelLayout:
        """Validate ``tensor`` × ``context`` against the world and the model; DP takes the rest."""
        if tensor < 1 or context < 1:
            raise ValueError(
                f"parallel sizes must be >= 1 (tensor_parallel={tensor}, context_parallel={context})"
            )
        if world_size % (tensor * context):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel × context_parallel = "
                f"{tensor} × {context}"
            )
        if num_heads % (tensor * context):
            raise ValueError(
                f"model.num_heads={num_heads} is not divisible by tensor_parallel × context_parallel = "
                f"{tensor} × {context}: each rank needs whole heads"
            )
        return cls(tensor, context, world_size // (tensor * context))


def export_launch_env(env: LaunchEnv) -> None:
    """torchrun's variables for what SLURM described: DeepSpeed (and others) read ``LOCAL_RANK`` & co."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def init_process_groups(
    layout: ParallelLayout, device: torch.device, env: LaunchEnv, timeout: timedelta = timedelta(minutes=10)
) -> None:
    """The default process group (gloo on CPU, NCCL on CUDA) and megatron-core's TP/CP/DP groups."""
    from megatron.core import parallel_state

    if layout.tensor * layout.context * layout.data != env.world_size:
        raise ValueError(f"layout {layout} does not cover the {env.world_size} ranks of the job")
    export_launch_env(env)
    if device.type == "cpu":
        import megatron_patches

        megatron_patches.apply()  # megatron's sequence-parallel buffers and RNG tracker call CUDA otherwise
    else:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        context_parallel_size=layout.context,
        distributed_timeout_minutes=max(1, int(timeout.total_seconds() // 60)),
        order="tp-cp-ep-dp-pp",
    )


def resolve_device(requested: str) -> torch.device:
    """The device ``parallel.device`` names: ``auto`` is CUDA where there is one, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda, but CUDA is not available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)

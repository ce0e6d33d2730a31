"""Run a function on several CPU ranks over gloo, as torchrun would, and collect what each returns.

Ranks are forked from one server process that imported torch, DeepSpeed, megatron-core and the
package once for the whole session (``forkserver`` with preloaded modules): a fresh rank then
starts in a fraction of a second instead of spending seconds on imports, which on two cores was
most of the time of every multi-rank test. The server never runs a test, so each rank starts
from the same clean state a spawned process would; the environment is the caller's at the time
of the call, as with ``spawn``.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once by the fork server (a module missing here is skipped, never an error).
PRELOAD = [
    "torch",
    "torch.distributed",
    "deepspeed",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "imontage.train.trainer",
    "imontage.parallel.parallelize",
    "imontage.parallel.engine",
    "diffusers",
]


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int,
    world_size: int,
    port: int,
    environ: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    done: Any,
) -> None:
    os.environ.clear()  # the caller's environment, not the fork server's
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # Each rank gets its share of the cores, as torchrun gives each of its ranks OMP_NUM_THREADS=1:
    # two ranks of two threads each on two cores spend their time waiting for each other.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Tensors in the result are shared through this process: stay alive until the parent has them.
        done.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` new processes; their return values by rank.

    ``fn`` must be importable (a module-level function). A rank that raises makes this raise
    :class:`RankError` with its traceback; ranks that do not all report within ``timeout`` seconds
    make it raise ``TimeoutError``, with every process killed.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts: at the first call
    results, done = context.Queue(), context.Event()
    port = free_port()
    processes = [
        context.Process(
            target=_entry,
            args=(rank, world_size, port, dict(os.environ), fn, args, results, done),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            try:
                rank, ok, value = results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world_size)) - set(outcomes))} of {fn.__name__} did not report "
                    f"within {timeout:.0f} s"
                ) from None
            outcomes[rank] = (ok, value)
            if not ok:
                break  # the other ranks may be blocked in a collective with the one that failed
    finally:
        done.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(outcomes.items()) if not ok]
    if failures:
        raise RankError("\n".join(failures))
    return [outcomes[rank][1] for rank in range(world_size)]

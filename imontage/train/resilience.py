"""Fault tolerance for long runs: preemption signals, requeue, numerical faults, collective timeouts.

The trainer uses these pieces at the end of every optimiser step, in this order::

    check = guard.check(step, loss, grad_norm)       # collective: every rank gets the same verdict
    if check.skip: ...                                # drop the step's gradients on every rank
    spike = spikes.observe(step, mean_loss)           # local; the loss every rank logs
    if agree_to_stop(signals.requested):              # collective: a signal on any rank stops all
        save a checkpoint; exit with requeue_verdict().exit_code    # the job script requeues on 75

Every decision that changes what ranks do next is taken collectively, so that no rank leaves a
collective the others are still in. Nothing here logs: each function returns what happened and
the trainer writes it down.
"""

from __future__ import annotations

import enum
import math
import os
import signal
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d


class ExitCode(enum.IntEnum):
    """Exit status of a trainer process that stopped on purpose, for job scripts and wrappers."""

    REQUEUED = 75  # stopped on a signal after a checkpoint; the job script requeues (sysexits EX_TEMPFAIL)
    STOPPED = 76  # stopped on a signal after a checkpoint; not to be requeued (not SLURM, limit reached)
    NUMERICAL_FAULT = 77  # non-finite loss or gradients (nonfinite=fail, or too many skips in a row)


DEFAULT_STOP_SIGNALS = ("SIGUSR2", "SIGTERM")
MAX_REQUEUES_ENV = "IMONTAGE_MAX_REQUEUES"
DEFAULT_MAX_REQUEUES = 3  # tools/submit.py's --max-requeues default, for jobs submitted by hand


# ---------------------------------------------------------------------------------------------------
# Preemption signals


class StopSignals:
    """Catches stop signals (SLURM's ``--signal=USR2@90``, SIGTERM at preemption) as a flag.

    The handler only records the signal: a handler runs between two bytecodes of whatever the
    main thread was doing (inside a collective, a checkpoint write, a logging call holding its
    lock), so doing I/O there could deadlock or corrupt state. The training loop reads
    :attr:`requested` at the end of a step and stops through :func:`agree_to_stop`.

    Use as a context manager, or :meth:`install` / :meth:`uninstall`; the handlers that were there
    before are put back on exit. Must be installed from the main thread (a Python rule).
    """

    def __init__(self, names: Sequence[str] = DEFAULT_STOP_SIGNALS) -> None:
        self.signals = tuple(_signal_named(name) for name in names)
        self._previous: dict[signal.Signals, Any] = {}
        self._received: int | None = None

    @property
    def requested(self) -> bool:
        """True once any of the signals has arrived."""
        return self._received is not None

    @property
    def received(self) -> signal.Signals | None:
        """The first signal that arrived, or None."""
        return None if self._received is None else signal.Signals(self._received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only an attribute store: no I/O, no locks, no allocation beyond the int (see the class doc).
        if self._received is None:
            self._received = signum

    def install(self) -> StopSignals:
        if self._previous:
            raise RuntimeError("StopSignals is already installed")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the previous handlers; one installed outside Python (None) becomes the default."""
        while self._previous:
            sig, previous = self._previous.popitem()
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    def ignore_until_exit(self) -> None:
        """Ignores these signals from now on, after :meth:`uninstall` too: the process is leaving.

        After its stop checkpoint a rank exits with an agreed code (:class:`ExitCode`). The first
        rank to exit makes srun (``--kill-on-bad-exit``) send SIGTERM to the others: dying of it
        would turn their 75 into "Terminated" and srun's status into 143, which the job script does
        not requeue. A rank that hangs is still ended by SLURM's SIGKILL, ``KillWait`` later.
        """
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
            if sig in self._previous:
                self._previous[sig] = signal.SIG_IGN

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def _signal_named(name: str) -> signal.Signals:
    try:
        sig = signal.Signals[name]
    except KeyError:
        raise ValueError(
            f"stop signal {name!r} is not a signal name (for example SIGUSR2, SIGTERM)"
        ) from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"stop signal {name} cannot be caught")
    return sig


# ---------------------------------------------------------------------------------------------------
# Collective decisions


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor for a collective on ``group`` must live: the current GPU for NCCL, else CPU."""
    if _distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(local: bool | torch.Tensor, device: torch.device | None, group: Any) -> bool:
    """True on every rank when ``local`` is true on at least one: one MAX all-reduce of an int."""
    flag = torch.as_tensor(local, dtype=torch.int32, device=device or collective_device(group)).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def agree_to_stop(local: bool, device: torch.device | None = None, group: Any = None) -> bool:
    """Whether any rank wants to stop; every rank of ``group`` (default: all) gets the same answer.

    SLURM signals every task, but not at the same instant: one rank may see the flag a step
    before another. Deciding on the OR over ranks at the end of a step makes all of them save
    the same step and leave together. Without a process group this is ``local``. A collective:
    every rank must call it at the same point. ``device``: default from :func:`collective_device`.
    """
    if not _distributed():
        return local
    return _any_rank(local, device, group)


# ---------------------------------------------------------------------------------------------------
# Requeue


class RequeueOutcome(enum.Enum):
    REQUESTED = "to be requeued"  # exit REQUEUED: the job script requeues once srun has returned
    NOT_SLURM = "not under SLURM"
    LIMIT_REACHED = "requeue limit reached"


@dataclass(frozen=True)
class RequeueResult:
    outcome: RequeueOutcome
    detail: str  # one line for the log: the job, the counts

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.REQUEUED if self.outcome is RequeueOutcome.REQUESTED else ExitCode.STOPPED


def max_requeues(environ: Mapping[str, str] | None = None) -> int:
    """The requeue limit from ``IMONTAGE_MAX_REQUEUES`` (set by the job script), else the default.

    Call it at start-up too, so that a bad value fails then rather than at the first preemption.
    """
    env = os.environ if environ is None else environ
    value = env.get(MAX_REQUEUES_ENV, "")
    if not value:
        return DEFAULT_MAX_REQUEUES
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{MAX_REQUEUES_ENV}={value!r} is not an integer") from None
    if limit < 0:
        raise ValueError(f"{MAX_REQUEUES_ENV}={limit} must be >= 0")
    return limit


def requeue_verdict(environ: Mapping[str, str] | None = None) -> RequeueResult:
    """Whether this SLURM job should be requeued after a stop checkpoint; the trainer exits with its code.

    No rank requeues the job itself: ``scontrol requeue`` of a running job makes SLURM kill the
    job step (SIGTERM to every task and to srun, which then SIGKILLs them), so a rank that ran it
    raced the other ranks' exit and the batch script's exit status. Instead every rank exits with
    :attr:`RequeueResult.exit_code` and the job script (``slurm/*.sbatch``) runs ``scontrol
    requeue`` once srun has returned 75, when no task is left to kill. The verdict depends only on
    the job's environment, the same in every task: ``SLURM_JOB_ID``, ``SLURM_RESTART_COUNT``
    (absent on a first run: the number of earlier requeues) against :func:`max_requeues`.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        return RequeueResult(RequeueOutcome.NOT_SLURM, "SLURM_JOB_ID is not set: no job to requeue")
    restarts_text = env.get("SLURM_RESTART_COUNT", "") or "0"
    if not restarts_text.isdigit():
        raise ValueError(f"SLURM_RESTART_COUNT={restarts_text!r} is not a count")
    restarts = int(restarts_text)
    limit = max_requeues(env)
    counts = f"job {job_id}, restart count {restarts}, {MAX_REQUEUES_ENV}={limit}"
    if restarts >= limit:
        return RequeueResult(RequeueOutcome.LIMIT_REACHED, f"not requeued: {counts}")
    return RequeueResult(
        RequeueOutcome.REQUESTED,
        f"to be requeued by the job script once every task has exited ({counts})",
    )


# ---------------------------------------------------------------------------------------------------
# Numerical faults


class NumericalFault(RuntimeError):
    """Non-finite values the run may not step over; raised on every rank at the same step."""


@dataclass(frozen=True)
class StepCheck:
    skip: bool  # True: no rank may apply this step's gradients
    detail: str = ""  # for the log when skip: the step, the ranks and their values


class NonFiniteGuard:
    """Decides, on all ranks alike, whether a step with a non-finite loss or gradient norm is dropped.

    A NaN on one rank poisons every rank once gradients are reduced, and ranks that disagreed on
    skipping would leave the optimiser states apart; so the verdict is one MAX all-reduce of a
    flag, taken before the optimiser step. Mode ``skip`` drops the step and counts it (a resumed
    run continues the counts through :meth:`state_dict`), and raises :class:`NumericalFault` once
    more than ``max_consecutive_skips`` steps in a row are bad; ``fail`` raises at the first one.
    """

    def __init__(
        self,
        mode: str = "skip",
        max_consecutive_skips: int = 10,
        device: torch.device | None = None,
        group: Any = None,
    ) -> None:
        if mode not in ("skip", "fail"):
            raise ValueError(f"nonfinite mode {mode!r} is not one of skip, fail")
        self.mode = mode
        self.max_consecutive_skips = max_consecutive_skips
        self.device = device
        self.group = group
        self.skipped_total = 0
        self.consecutive = 0
        self.last_bad_step: int | None = None

    @classmethod
    def from_config(cls, faults: Any, device: torch.device | None = None) -> NonFiniteGuard:
        """From the recipe's ``train.faults`` section."""
        return cls(faults.nonfinite, faults.max_consecutive_skips, device)

    def check(
        self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None
    ) -> StepCheck:
        """The verdict on ``step`` from this rank's loss and gradient norm; a collective.

        Values stay on their device until the single ``.item()`` of the agreed flag.
        """
        device = self.device or collective_device(self.group)
        values = _local_values(loss, grad_norm, device)  # [2] float64: loss, grad norm
        bad_here = ~torch.isfinite(values).all()
        bad = _any_rank(bad_here, device, self.group) if _distributed() else bool(bad_here.item())
        if not bad:
            self.consecutive = 0
            return StepCheck(skip=False)
        detail = f"step {step}: non-finite values, " + _describe_bad_ranks(
            values, grad_norm is not None, self.group
        )
        self.last_bad_step = step
        if self.mode == "fail":
            raise NumericalFault(f"{detail} (train.faults.nonfinite=fail)")
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive_skips:
            raise NumericalFault(
                f"{detail}; {self.consecutive} bad steps in a row, more than "
                f"train.faults.max_consecutive_skips={self.max_consecutive_skips}"
            )
        return StepCheck(skip=True, detail=f"{detail}; step skipped ({self.skipped_total} in all)")

    def state_dict(self) -> dict[str, Any]:
        """JSON-native counters, for the checkpoint's trainer state."""
        return {
            "skipped_total": self.skipped_total,
            "consecutive": self.consecutive,
            "last_bad_step": self.last_bad_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _expect_keys(state, ("skipped_total", "consecutive", "last_bad_step"), "NonFiniteGuard")
        self.skipped_total = int(state["skipped_total"])
        self.consecutive = int(state["consecutive"])
        self.last_bad_step = None if state["last_bad_step"] is None else int(state["last_bad_step"])


def _local_values(
    loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None, device: torch.device
) -> torch.Tensor:
    """``[loss, grad_norm]`` as float64 on ``device`` (0 for a missing norm), without a host sync."""
    parts = [
        torch.as_tensor(0.0 if value is None else value, dtype=torch.float64).detach().to(device).reshape(())
        for value in (loss, grad_norm)
    ]
    return torch.stack(parts)


def _describe_bad_ranks(values: torch.Tensor, has_grad_norm: bool, group: Any) -> str:
    """Which ranks hold non-finite values, and the values: an all-gather taken only on a bad step."""
    if _distributed():
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, values, group=group)
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    else:
        gathered, ranks = [values], [0]
    described = []
    for rank, rank_values in zip(ranks, gathered, strict=True):
        loss, norm = rank_values.tolist()
        if math.isfinite(loss) and math.isfinite(norm):
            continue
        text = f"rank {rank}: loss={loss}"
        described.append(text + (f" grad_norm={norm}" if has_grad_norm else ""))
    return "; ".join(described)


class LossSpikeDetector:
    """Reports a loss above ``factor`` × the largest of the last ``window`` finite losses.

    A spike is reported, not acted on: it often precedes divergence and is worth a line in the
    log and a counter in TensorBoard. Feed it the loss every rank logs (averaged over ranks) so
    that the counts agree between ranks. Reports start once the window is full, so the steep
    first steps do not count; spikes enter the window too, so a lasting jump is reported once.
    """

    def __init__(self, factor: float = 3.0, window: int = 100) -> None:
        if factor != 0 and factor <= 1:
            raise ValueError(f"spike factor {factor} must be > 1 (or 0: off)")
        if window < 1:
            raise ValueError(f"spike window {window} must be >= 1")
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)
        self.spikes_total = 0
        self.last_spike_step: int | None = None

    @classmethod
    def from_config(cls, faults: Any) -> LossSpikeDetector:
        return cls(faults.spike_factor, faults.spike_window)

    def observe(self, step: int, loss: float) -> str | None:
        """A one-line report when ``loss`` is a spike, else None; non-finite losses are ignored."""
        loss = float(loss)
        if not math.isfinite(loss):
            return None
        report = None
        full = len(self.losses) == self.losses.maxlen
        if self.factor and full and loss > self.factor * (peak := max(self.losses)):
            self.spikes_total += 1
            self.last_spike_step = step
            report = (
                f"step {step}: loss spike {loss:.6g} > {self.factor:g} × {peak:.6g}, the largest of the "
                f"last {len(self.losses)} losses ({self.spikes_total} spikes in all)"
            )
        self.losses.append(loss)
        return report

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "spikes_total": self.spikes_total,
            "last_spike_step": self.last_spike_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the counts and window; a smaller window keeps the most recent losses."""
        _expect_keys(state, ("losses", "spikes_total", "last_spike_step"), "LossSpikeDetector")
        self.losses.clear()
        self.losses.extend(float(loss) for loss in state["losses"])
        self.spikes_total = int(state["spikes_total"])
        self.last_spike_step = None if state["last_spike_step"] is None else int(state["last_spike_step"])


def _expect_keys(state: Mapping[str, Any], keys: Sequence[str], owner: str) -> None:
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(
            f"{owner} state lacks {', '.join(missing)} (has {', '.join(sorted(state)) or 'nothing'})"
        )


# ---------------------------------------------------------------------------------------------------
# Collective timeouts


def set_collective_timeout(seconds: float) -> int:
    """Sets the timeout of every process group this rank belongs to; returns how many it changed.

    Start-up (NCCL communicator creation, compilation, the first checkpoint load) needs a long
    timeout; after the first step a collective that waits minutes means a rank is lost, and the
    job should fail fast so that SLURM can requeue it. torch 2.13 has no public API for this:
    ``distributed_c10d._set_pg_timeout`` sets the default timeout of a group's gloo and NCCL
    backends, which collectives issued afterwards use. It covers the groups megatron-core and
    DeepSpeed create, which are all in the c10d registry. A no-op without a process group.
    """
    if seconds <= 0:
        raise ValueError(f"collective timeout must be positive, got {seconds} s")
    if not _distributed():
        return 0
    timeout = timedelta(seconds=seconds)
    groups = [
        pg for pg in list(distributed_c10d._world.pg_map) if not distributed_c10d._rank_not_in_group(pg)
    ]
    for group in groups:
        distributed_c10d._set_pg_timeout(timeout, group)
    return len(groups)

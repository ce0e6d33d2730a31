"""Fault tolerance: real signals, stop and skip decisions on 2 gloo ranks, requeue, spikes, timeouts."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

from imontage.train.resilience import (
    DEFAULT_MAX_REQUEUES,
    ExitCode,
    LossSpikeDetector,
    NonFiniteGuard,
    NumericalFault,
    RequeueOutcome,
    StopSignals,
    agree_to_stop,
    max_requeues,
    requeue_verdict,
    set_collective_timeout,
)


def wait_for(condition, seconds: float = 5.0) -> bool:
    """Python runs a signal's handler at the next bytecode boundary of the main thread."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


# ---------------------------------------------------------------------------------------------- signals


def test_a_real_signal_sets_the_flag_and_the_previous_handler_comes_back() -> None:
    seen: list[int] = []
    term_before = signal.getsignal(signal.SIGTERM)

    def previous_handler(signum: int, frame: object) -> None:
        seen.append(signum)

    original = signal.signal(signal.SIGUSR2, previous_handler)
    try:
        with StopSignals(["SIGUSR2", "SIGTERM"]) as stop:
            assert not stop.requested and stop.received is None
            os.kill(os.getpid(), signal.SIGUSR2)
            assert wait_for(lambda: stop.requested)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not replace the first
            time.sleep(0.01)
            assert stop.received is signal.SIGUSR2
            assert seen == []  # ours ran instead of the previous handler
        assert signal.getsignal(signal.SIGUSR2) is previous_handler
        assert signal.getsignal(signal.SIGTERM) == term_before
        os.kill(os.getpid(), signal.SIGUSR2)
        assert wait_for(lambda: seen == [signal.SIGUSR2])
    finally:
        signal.signal(signal.SIGUSR2, original)


def test_a_leaving_rank_ignores_the_stop_signals_after_uninstall() -> None:
    """srun's SIGTERM to the ranks still exiting must not kill them (their exit code is the verdict)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        with StopSignals(["SIGUSR2", "SIGTERM"]) as stop:
            stop.ignore_until_exit()
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in before)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest if it were not ignored
        time.sleep(0.01)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_stop_signals_refuse_bad_names_and_double_install() -> None:
    with pytest.raises(ValueError, match="'SIGNOPE' is not a signal name"):
        StopSignals(["SIGNOPE"])
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        StopSignals(["SIGKILL"])
    with StopSignals(["SIGUSR2"]) as stop, pytest.raises(RuntimeError, match="already installed"):
        stop.install()


def stop_when_one_rank_is_signalled(rank: int, world_size: int) -> tuple[bool, bool, bool]:
    quiet = agree_to_stop(False, torch.device("cpu"))
    with StopSignals() as stop:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
            wait_for(lambda: stop.requested)
        return quiet, stop.requested, agree_to_stop(stop.requested)


def test_agree_to_stop_stops_every_rank_when_one_is_signalled() -> None:
    ranks = run_ranks(stop_when_one_rank_is_signalled, 2)
    assert ranks == [(False, False, True), (False, True, True)]


def test_agree_to_stop_without_a_process_group_is_the_local_flag() -> None:
    assert not dist.is_initialized()
    assert agree_to_stop(True) and not agree_to_stop(False)


# ---------------------------------------------------------------------------------------------- requeue


JOB = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1", "IMONTAGE_MAX_REQUEUES": "3"}


def test_a_job_under_its_limit_asks_the_job_script_to_requeue() -> None:
    result = requeue_verdict(JOB)
    assert result.outcome is RequeueOutcome.REQUESTED and result.exit_code is ExitCode.REQUEUED
    assert "requeued by the job script" in result.detail and "restart count 1" in result.detail


@pytest.mark.parametrize("restarts", ["3", "7"])
def test_the_requeue_limit_is_respected(restarts: str) -> None:
    result = requeue_verdict({**JOB, "SLURM_RESTART_COUNT": restarts})
    assert result.outcome is RequeueOutcome.LIMIT_REACHED and result.exit_code is ExitCode.STOPPED
    assert f"restart count {restarts}" in result.detail and "IMONTAGE_MAX_REQUEUES=3" in result.detail


def test_outside_slurm_nothing_is_requeued() -> None:
    result = requeue_verdict({})
    assert result.outcome is RequeueOutcome.NOT_SLURM and result.exit_code is ExitCode.STOPPED


def test_the_requeue_limit_comes_from_the_environment() -> None:
    assert max_requeues({}) == DEFAULT_MAX_REQUEUES
    assert max_requeues({"IMONTAGE_MAX_REQUEUES": "0"}) == 0
    with pytest.raises(ValueError, match="IMONTAGE_MAX_REQUEUES='many' is not an integer"):
        max_requeues({"IMONTAGE_MAX_REQUEUES": "many"})
    assert requeue_verdict({**JOB, "SLURM_RESTART_COUNT": "0", "IMONTAGE_MAX_REQUEUES": "0"}).outcome is (
        RequeueOutcome.LIMIT_REACHED
    )


# ----------------------------------------------------------------------------------- numerical faults


def guard_with_one_nan_rank(rank: int, world_size: int, mode: str) -> dict:
    guard = NonFiniteGuard(mode, max_consecutive_skips=3)
    first = guard.check(1, torch.tensor(0.5), grad_norm=2.0)
    loss = torch.tensor(float("nan")) if rank == 1 else torch.tensor(0.25)
    try:
        bad = guard.check(2, loss, grad_norm=torch.tensor(1.0))
    except NumericalFault as fault:
        return {"raised": str(fault)}
    after_bad = guard.state_dict()
    good = guard.check(3, 0.1, 1.0)
    return {
        "first": first.skip,
        "bad": bad,
        "after_bad": after_bad,
        "good": good.skip,
        "end": guard.state_dict(),
    }


def test_a_nan_on_one_rank_skips_the_step_on_both() -> None:
    ranks = run_ranks(guard_with_one_nan_rank, 2, "skip")
    for result in ranks:
        assert result["first"] is False and result["good"] is False
        assert result["bad"].skip is True
        assert "step 2" in result["bad"].detail and "rank 1: loss=nan grad_norm=1.0" in result["bad"].detail
        assert "rank 0" not in result["bad"].detail
        assert result["after_bad"] == {"skipped_total": 1, "consecutive": 1, "last_bad_step": 2}
        assert result["end"] == {"skipped_total": 1, "consecutive": 0, "last_bad_step": 2}


def test_fail_mode_raises_on_both_ranks_naming_step_rank_and_value() -> None:
    ranks = run_ranks(guard_with_one_nan_rank, 2, "fail")
    for result in ranks:
        assert "step 2" in result["raised"] and "rank 1: loss=nan" in result["raised"]
        assert "nonfinite=fail" in result["raised"]


def test_too_many_bad_steps_in_a_row_raise() -> None:
    guard = NonFiniteGuard("skip", max_consecutive_skips=2)
    assert guard.check(1, float("inf")).skip and guard.check(2, 1.0, float("nan")).skip
    assert not guard.check(3, 1.0, 1.0).skip  # a good step resets the run of bad ones
    assert guard.check(4, float("nan")).skip and guard.check(5, float("nan")).skip
    with pytest.raises(NumericalFault, match=r"step 6: .*rank 0: loss=nan.*3 bad steps in a row.*=2"):
        guard.check(6, float("nan"))
    assert guard.state_dict() == {"skipped_total": 5, "consecutive": 3, "last_bad_step": 6}


def test_a_large_finite_loss_is_not_mistaken_for_an_overflow() -> None:
    assert not NonFiniteGuard().check(1, 1e39, torch.tensor(1e30, dtype=torch.float64)).skip


def test_guard_state_round_trips_through_json() -> None:
    guard = NonFiniteGuard("skip", max_consecutive_skips=5)
    guard.check(7, float("nan"))
    guard.check(8, float("nan"))
    state = json.loads(json.dumps(guard.state_dict()))
    resumed = NonFiniteGuard("skip", max_consecutive_skips=5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == guard.state_dict()
    assert resumed.check(9, float("nan")).skip and resumed.consecutive == 3 and resumed.skipped_total == 3
    with pytest.raises(ValueError, match="lacks consecutive"):
        resumed.load_state_dict({"skipped_total": 1, "last_bad_step": None})


# ------------------------------------------------------------------------------------------ loss spikes


def test_a_spike_over_the_window_max_is_reported_and_counted() -> None:
    spikes = LossSpikeDetector(factor=2.0, window=3)
    assert [spikes.observe(step, loss) for step, loss in enumerate([9.0, 1.0, 1.2], start=1)] == [None] * 3
    assert spikes.observe(4, 17.0) is None  # 17 < 2 × 9: the window's max, not its mean
    assert spikes.observe(5, float("nan")) is None  # non-finite losses are the guard's business
    assert spikes.observe(6, 2.0) is None  # the window is now 1.2, 17, 2
    assert spikes.observe(7, 3.0) is None
    report = spikes.observe(8, 40.0)  # window 17, 2, 3
    assert report is not None and "step 8: loss spike 40 > 2 × 17" in report
    assert spikes.spikes_total == 1 and spikes.last_spike_step == 8
    assert spikes.observe(9, 41.0) is None  # the spike is in the window: a lasting jump counts once


def test_no_spike_before_the_window_is_full_or_when_off() -> None:
    spikes = LossSpikeDetector(factor=2.0, window=4)
    assert [spikes.observe(s, loss) for s, loss in enumerate([1.0, 5.0, 50.0, 500.0])] == [None] * 4
    off = LossSpikeDetector(factor=0, window=1)
    assert [off.observe(s, loss) for s, loss in enumerate([1.0, 1e9])] == [None, None]
    with pytest.raises(ValueError, match="must be > 1"):
        LossSpikeDetector(factor=0.5)


def test_spike_state_round_trips_and_the_resumed_run_continues() -> None:
    losses = [1.0, 1.1, 0.9, 5.0, 1.0, 30.0]
    straight = LossSpikeDetector(factor=3.0, window=3)
    reports = [straight.observe(step, loss) for step, loss in enumerate(losses)]

    first = LossSpikeDetector(factor=3.0, window=3)
    for step, loss in enumerate(losses[:4]):
        first.observe(step, loss)
    resumed = LossSpikeDetector(factor=3.0, window=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.observe(step, loss) for step, loss in enumerate(losses[4:], start=4)] == reports[4:]
    assert resumed.state_dict() == straight.state_dict()
    assert straight.spikes_total == 2

    smaller = LossSpikeDetector(factor=3.0, window=2)
    smaller.load_state_dict(straight.state_dict())
    assert list(smaller.losses) == [1.0, 30.0]


# ------------------------------------------------------------------------------------ collective timeout

SHORT_TIMEOUT_S = 2.0
MARGIN_S = 4.0


def timed_out_collective(rank: int, world_size: int) -> tuple[int, float, str]:
    dist.all_reduce(torch.ones(1))  # connected, and the default 30-minute gloo timeout in force
    changed = set_collective_timeout(SHORT_TIMEOUT_S)
    if rank == 1:
        return changed, 0.0, "never joined"  # alive (run_ranks holds it) but never joins the all-reduce
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as error:
        return changed, time.monotonic() - start, str(error)
    return changed, time.monotonic() - start, "no error"


def test_a_lowered_timeout_fails_a_collective_that_a_rank_never_joins() -> None:
    (changed, elapsed, error), (changed_1, _, _) = run_ranks(timed_out_collective, 2, timeout=60)
    assert changed >= 1 and changed_1 >= 1
    assert "Timed out" in error, error
    assert SHORT_TIMEOUT_S * 0.8 <= elapsed <= SHORT_TIMEOUT_S + MARGIN_S, elapsed


def test_set_collective_timeout_without_a_group_does_nothing() -> None:
    assert set_collective_timeout(5.0) == 0
    with pytest.raises(ValueError, match="must be positive"):
        set_collective_timeout(0)

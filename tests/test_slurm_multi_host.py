"""slurm/multi_node.sbatch on a real SLURM cluster of two hosts, each in its own network namespace
(slurm/multi_host_cluster.sh): the ranks of one job on both hosts, gloo between them over the
veth network, the same losses as the same world size on one host, and the job's faults across the
hosts (issue 22).

Kept cheap enough for `make test`: one cluster and one set of shards for the module, a ZeRO-3 DP=2
recipe shared by the plain run, the preemption and both faults, whose uninterrupted losses are
computed once (``dp2_losses``), a collective timeout of a few seconds for the faults, and a cluster
whose SlurmdTimeout is short (``SLURMD_TIMEOUT_S``)."""

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO
from distributed import free_port, run_ranks
from test_slurm import job_field, release_requeued, uninterrupted, wait_for_job, wait_for_step

from imontage.checkpoint import store as ckpt
from imontage.train.logger import read_metrics

CLUSTER = "slurm/multi_host_cluster.sh"

# The test cluster's SlurmdTimeout: a host that answers no ping this long is DOWN and its job ends
# (NODE_FAIL). Shorter than the script's default (20 s) so that a cut link ends its job sooner;
# long enough that a slurmd on 2 loaded cores is never taken for lost.
SLURMD_TIMEOUT_S = 10
STEPS = 12  # of the DP=2 runs: the faults come after step FAULT_AFTER_STEP, with steps left to resume
CHECKPOINT_EVERY = 2
FAULT_AFTER_STEP = 3
# The DP=2 runs' train.faults.timeout_s: a collective a lost peer never joins fails after it.
# A few seconds, above what a checkpoint save makes one rank wait for the other on loaded cores.
COLLECTIVE_TIMEOUT_S = 6
EXIT_SLACK_S = 20  # on top of it: the ranks' exit, srun's kill of the rest, on 2 shared cores
LOST_JOB_END_S = 30  # from the kill to the job's end: srun's kill of the step and the script's exit
# From the cut to the job's end: SlurmdTimeout, then up to a ping interval (a third of it) and a
# failed ping's wait before slurmctld sets the host DOWN, plus slack for loaded cores.
CUT_JOB_END_S = SLURMD_TIMEOUT_S + 30
# From USR2 to the job requeued: both ranks finish their step, save, leave, the script requeues.
PREEMPT_REQUEUE_S = 60
JOB_PROCESSES_GONE_S = 30  # from the job's end until none of its processes is left on either host
# slurmctld's kill of the job on the cut-off host fails (no route) and is retried up to 60 s later
# (its agent's retry interval), after a message timeout (10 s): a requeued run started on that host
# before then is killed by it (SIGTERM: it stops, exit 75, requeued again; seen in the stress loop).
# SLURM's own hold of a requeued job (two minutes) outlasts it; the test's release waits for it.
STALE_KILL_S = 10 + 60 + 5


@pytest.fixture(scope="module")
def multi_host_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two hosts (slurmctld + one slurmd per namespace) on free ports, stopped and removed afterwards."""
    state = tmp_path_factory.mktemp("slurm-multi")
    # One thread per rank, as run_ranks's ranks use, so that the job's losses can equal its bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURMCTLD_PORT": str(free_port()),
           "SLURMD_PORT": str(free_port()), "SLURMD_TIMEOUT": str(SLURMD_TIMEOUT_S)}  # fmt: skip
    result = subprocess.run(["bash", CLUSTER, "start", str(state), "2"], cwd=REPO, env=env, capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode == 3:  # the script's code for "cannot run here" (not root, no slurm-wlm)
        pytest.skip(f"no multi-host SLURM: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        status = subprocess.run(["bash", CLUSTER, "status", str(state)], cwd=REPO, env=env, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        made = cluster_id(state)
        for host in (1, 2):  # sinfo's line of each host, and the processes of its namespace (its slurmd)
            assert re.search(rf"^im{made}h{host} .* idle ", status, re.MULTILINE), status
            assert f"imontage-{made}-h{host}: " in status, status
        yield {**env, "SLURM_CONF": str(state / "slurm.conf"), "IMONTAGE_CLUSTER_DIR": str(state)}
    finally:
        subprocess.run(["bash", CLUSTER, "stop", str(state)], cwd=REPO, check=False)
    hosts = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"imontage-{cluster_id(state)}-" not in hosts, hosts


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("multi-host-data")
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(data), "--samples", "48", "--no-progress"],
                   cwd=REPO, check=True)  # fmt: skip
    return data


def recipe_overrides(shards: Path, parallel: str, steps: int, checkpoint_every: int) -> list[str]:
    """The tiny quickstart run every job of the module trains (run_dir aside)."""
    return [f"data.shards={shards}/train-*.tar", f"stages.sft.steps={steps}", "data.max_tokens=768",
            f"parallel={parallel}", "parallel.device=cpu", "train.sample.every=0", "train.progress=false",
            f"train.checkpoint.every={checkpoint_every}",
            "train.checkpoint.keep_last=0", f"train.faults.timeout_s={COLLECTIVE_TIMEOUT_S}"]  # fmt: skip


@pytest.fixture(scope="module")
def dp2_overrides(shards: Path) -> list[str]:
    """The ZeRO-3 DP=2 run of the plain 2 x 1 job, the preemption and both faults."""
    return recipe_overrides(shards, "zero3_dp2", STEPS, CHECKPOINT_EVERY)


@pytest.fixture(scope="module")
def dp2_losses(dp2_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The DP=2 run's losses, uninterrupted, on one host (run_ranks): what every DP=2 job must end with."""
    run_dir = tmp_path_factory.mktemp("dp2-reference") / "run"
    return run_ranks(uninterrupted, 2, [f"run_dir={run_dir}", *dp2_overrides], timeout=300)[0]


def cluster_id(state: Path) -> str:
    """The id the script names its bridge, namespaces and hosts after."""
    conf = (state / "slurm.conf").read_text()
    return next(line.split("=")[1].split()[0][2:].split("h")[0] for line in conf.splitlines()
                if line.startswith("NodeName="))  # fmt: skip


def placement_python(tmp_path: Path) -> Path:
    """An interpreter wrapper for --python: each task writes where SLURM put it, then runs the trainer."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$SLURM_PROCID $SLURM_LOCALID $SLURMD_NODENAME $(readlink /proc/self/ns/net) $MASTER_ADDR" '
        f'> {tmp_path}/placement-"$SLURM_PROCID"\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def namespace_of(host: str, state: Path) -> str:
    """``net:[inode]`` of the namespace a host runs in, as /proc/<pid>/ns/net reads inside it."""
    number = host.rsplit("h", 1)[1]
    inode = os.stat(f"/run/netns/imontage-{cluster_id(state)}-h{number}").st_ino
    return f"net:[{inode}]"


def submit_across_hosts(env: dict[str, str], tmp_path: Path, name: str, tasks_per_node: int,
                        overrides: list[str]) -> str:  # fmt: skip
    state = Path(env["IMONTAGE_CLUSTER_DIR"])
    submit = [sys.executable, "tools/submit.py", "configs/recipes/quickstart.yaml", "--time", "10", "--nodes", "2",
              "--gpus-per-node", str(tasks_per_node), "--log-dir", str(tmp_path / "logs"), "--job-name", name,
              "--env-hook", str(state / "env.sh"), "--python", str(placement_python(tmp_path)),
              *overrides]  # fmt: skip
    result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return result.stdout.split()[-1]


def job_log(tmp_path: Path, name: str, job: str) -> str:
    return (tmp_path / "logs" / f"{name}-{job}.out").read_text()


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.parametrize(
    ("tasks_per_node", "parallel"),
    [
        (1, "zero3_dp2"),
        (1, "tp2"),
        (2, "tp2"),  # TP inside each host, ZeRO-3 DP=2 across
    ],
)
def test_two_hosts_train_as_one_host_does(multi_host_cluster: dict[str, str], shards: Path, tasks_per_node: int,
                                          parallel: str, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:  # fmt: skip
    """2 hosts x 1 or 2 tasks: ZeRO-3 DP=2, TP=2 across the hosts, TP=2 x DP=2 give run_ranks's losses
    for the same world size on one host, bitwise."""
    state = Path(multi_host_cluster["IMONTAGE_CLUSTER_DIR"])
    world = 2 * tasks_per_node
    # DP=2 is the module's shared run, whose reference is computed once; TP runs 3 steps, unsaved.
    common = (
        request.getfixturevalue("dp2_overrides")
        if parallel == "zero3_dp2"
        else recipe_overrides(shards, parallel, 3, 0)
    )
    run_dir = tmp_path / "run"
    job = submit_across_hosts(multi_host_cluster, tmp_path, "imontage-2h", tasks_per_node,
                              [f"run_dir={run_dir}", *common])  # fmt: skip
    job_state = wait_for_job(job, multi_host_cluster)
    log = job_log(tmp_path, "imontage-2h", job)
    assert job_state == "COMPLETED", log
    assert f"job {job} restart 0: {world} tasks" in log, log
    placements = [(tmp_path / f"placement-{rank}").read_text().split() for rank in range(world)]
    # SLURM_PROCID and SLURM_LOCALID: ranks fill the first host, then the second.
    assert [p[:2] for p in placements] == [[str(r), str(r % tasks_per_node)] for r in range(world)], (
        placements
    )
    hosts = [p[2] for p in placements]
    assert len(set(hosts)) == 2 and hosts == sorted(hosts), placements
    for procid, _, host, namespace, _ in placements:
        assert namespace == namespace_of(host, state), (procid, host, namespace)
    # Every rank's master is the first host's NodeAddr: the host names resolve nowhere.
    master_addr = placements[0][4]
    assert master_addr.startswith("10.231.") and f"master {master_addr}" in log, log
    assert {p[4] for p in placements} == {master_addr}, placements

    if parallel == "zero3_dp2":
        expected = request.getfixturevalue("dp2_losses")
    else:
        expected = run_ranks(
            uninterrupted, world, [f"run_dir={tmp_path / 'reference'}", *common], timeout=300
        )[0]
    assert [r["loss"] for r in read_metrics(run_dir)] == expected


def test_a_failed_start_leaves_nothing_behind(tmp_path: Path) -> None:
    """A start that fails half-way (slurmctld refuses the configuration) removes what it made."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": "not-a-port"}
    result = subprocess.run(["bash", CLUSTER, "start", str(tmp_path), "2"], cwd=REPO, env=env, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode not in (0, 3), result.stdout + result.stderr
    made = cluster_id(tmp_path)
    assert (
        f"imontage-{made}-"
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    # Whole names ("5: imb42: <...>", "7: imv42h1@if6: <...>"): the module's cluster may be imb4217.
    names = {line.split(": ")[1].split("@")[0] for line in links.splitlines()}
    assert f"imb{made}" not in names and not any(n.startswith(f"imv{made}h") for n in names), links
    assert not (tmp_path / "slurmctld.pid").exists() and not (tmp_path / "cluster.env").exists()


@pytest.mark.slow
@pytest.mark.multihost
def test_usr2_reaches_both_hosts_and_the_requeue_resumes_on_both(
    multi_host_cluster: dict[str, str], dp2_overrides: list[str], dp2_losses: list[float], tmp_path: Path
) -> None:
    """`scancel --signal=USR2` stops the ranks of both hosts after the same step; every rank saves it,
    the job is requeued once, and the resumed run (both hosts again) ends with the uninterrupted losses."""
    run_dir = tmp_path / "run"
    name = "imontage-2h-preempt"
    job = submit_across_hosts(multi_host_cluster, tmp_path, name, 1, [f"run_dir={run_dir}", *dp2_overrides])
    wait_for_step(run_dir, FAULT_AFTER_STEP, job, multi_host_cluster)
    subprocess.run(["scancel", "--signal=USR2", job], env=multi_host_cluster, check=True)
    signalled = time.monotonic()
    release_requeued(job, multi_host_cluster, timeout=PREEMPT_REQUEUE_S)
    requeued_s = time.monotonic() - signalled
    job_state = wait_for_job(job, multi_host_cluster)
    print(f"preemption: requeued {requeued_s:.1f} s after the signal (bound {PREEMPT_REQUEUE_S} s), "
          f"the resumed job ended {time.monotonic() - signalled:.1f} s after it")  # fmt: skip
    log = job_log(tmp_path, name, job)
    assert job_state == "COMPLETED", log
    assert job_field(job, multi_host_cluster, "Restarts") == "1"
    assert f"job {job} restart 0: 2 tasks" in log and f"job {job} restart 1: 2 tasks" in log, log
    stops = re.findall(
        r"WARNING imontage\.train\.trainer: stopped after step (\d+) \((SIGUSR2 received here|a stop signal on another rank)\)",
        log,
    )
    assert len(stops) == 2 and stops[0][0] == stops[1][0], stops  # one line per rank, one per host
    # Both ranks had the signal by the time they left (after the checkpoint): it reached both hosts.
    assert all(where == "SIGUSR2 received here" for _, where in stops), stops
    step = int(stops[0][0])
    assert FAULT_AFTER_STEP <= step < STEPS, stops  # stopped mid-run, with steps left to resume
    stopped = run_dir / "checkpoints" / ckpt.checkpoint_name(step)
    shards = sorted(p.name for p in stopped.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # each rank's ZeRO-3 part of the stop checkpoint, one per host
    assert f"resumed from {stopped} at step {step}" in log, log
    placements = [(tmp_path / f"placement-{rank}").read_text().split() for rank in range(2)]
    assert len({p[2] for p in placements}) == 2, placements  # the resumed run is on both hosts again
    assert [r["loss"] for r in read_metrics(run_dir)] == dp2_losses  # the losses after the resume too


def job_processes(namespace: str, job: str) -> list[tuple[int, list[bytes]]]:
    """``(pid, argv)`` of every process of ``job`` in a host's namespace: its slurmstepds
    (``slurmstepd: [JOB.batch]``, ``[JOB.0]``, ...) and whatever carries ``SLURM_JOB_ID=JOB`` (the batch
    script, srun, the ranks)."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if argv[0].startswith(f"slurmstepd: [{job}.".encode()) or f"SLURM_JOB_ID={job}".encode() in environ:
            found.append((int(pid), argv))
    return found


def rank_pids(namespace: str, job: str) -> list[int]:
    """The training processes (``python -m imontage.train.cli``) of ``job`` in one host's namespace;
    not srun, whose command line holds the same words."""
    return [pid for pid, argv in job_processes(namespace, job) if argv[1:3] == [b"-m", b"imontage.train.cli"]]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; TimeoutError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def wait_for_no_job_processes(namespaces: list[str], job: str, timeout: float) -> float:
    """Seconds until no process of ``job`` is left in any of ``namespaces``; AssertionError naming
    what is left after ``timeout``."""
    try:
        return wait_until(lambda: not any(job_processes(ns, job) for ns in namespaces), timeout, "")
    except TimeoutError:
        left = {ns: [(pid, b" ".join(argv).decode(errors="replace")) for pid, argv in job_processes(ns, job)]
                for ns in namespaces}  # fmt: skip
        raise AssertionError(f"processes of job {job} left {timeout:.0f} s after it ended: {left}") from None


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.parametrize("fault", ["lost-host", "cut-link"])
def test_a_lost_host_or_cut_link_ends_the_job_in_bounded_time_and_the_requeue_resumes(
    multi_host_cluster: dict[str, str], dp2_overrides: list[str], dp2_losses: list[float], fault: str,
    tmp_path: Path
) -> None:  # fmt: skip
    """Host 2's ranks are SIGKILLed mid-run, or its link is down for longer than the collective
    timeout: every rank of both hosts is gone within timeout + slack, the job ends within its bound
    (FAILED, requeued by hand; or NODE_FAIL, requeued by SLURM), no process of the job is left in
    either namespace, and the requeued job resumes from the newest complete checkpoint and ends with
    the uninterrupted run's losses."""
    state = Path(multi_host_cluster["IMONTAGE_CLUSTER_DIR"])
    made = cluster_id(state)
    namespaces = [f"imontage-{made}-h1", f"imontage-{made}-h2"]
    run_dir = tmp_path / "run"
    name = "imontage-2h-fault"
    release_at = 0.0
    job = submit_across_hosts(multi_host_cluster, tmp_path, name, 1, [f"run_dir={run_dir}", *dp2_overrides])
    wait_for_step(run_dir, FAULT_AFTER_STEP, job, multi_host_cluster)
    assert rank_pids(namespaces[0], job) and rank_pids(namespaces[1], job)
    fault_at = time.monotonic()
    if fault == "lost-host":
        for pid in rank_pids(namespaces[1], job):
            os.kill(pid, signal.SIGKILL)
    else:
        subprocess.run(["ip", "link", "set", f"imv{made}h2", "down"], check=True)
    try:
        exit_s = wait_until(lambda: not rank_pids(namespaces[0], job) and not rank_pids(namespaces[1], job),
                            COLLECTIVE_TIMEOUT_S + EXIT_SLACK_S, "the ranks of both hosts did not exit")  # fmt: skip
        if fault == "cut-link":
            # srun never hears from the cut-off host's slurmstepd (it gives up sending while the link is
            # down): the job ends when slurmctld finds the host not responding (SlurmdTimeout), NODE_FAIL,
            # and SLURM requeues it itself (--requeue). The link stays down until then.
            wait_until(lambda: job_field(job, multi_host_cluster, "JobState") != "RUNNING",
                       CUT_JOB_END_S - (time.monotonic() - fault_at), f"job {job} did not end")  # fmt: skip
            end_s = time.monotonic() - fault_at
            release_at = time.time() + STALE_KILL_S
    finally:
        subprocess.run(["ip", "link", "set", f"imv{made}h2", "up"], check=True)
    if fault == "lost-host":
        job_state = wait_for_job(
            job, multi_host_cluster, timeout=LOST_JOB_END_S - (time.monotonic() - fault_at)
        )
        end_s = time.monotonic() - fault_at
        assert job_state == "FAILED", job_log(tmp_path, name, job)
        subprocess.run(["scontrol", "requeue", job], env=multi_host_cluster, check=True)  # as a user would
    else:
        assert end_s > COLLECTIVE_TIMEOUT_S  # the link was down for longer than the collective timeout
    assert job_field(job, multi_host_cluster, "Restarts") == "1"
    wait_for_no_job_processes(namespaces, job, JOB_PROCESSES_GONE_S)
    print(f"{fault}: every rank exited {exit_s:.1f} s after the fault (bound {COLLECTIVE_TIMEOUT_S + EXIT_SLACK_S} s),"
          f" the job ended {end_s:.1f} s after it, {job_field(job, multi_host_cluster, 'JobState')} now")  # fmt: skip

    newest = ckpt.find_resume_checkpoint(run_dir / "checkpoints")
    # A save the fault cut short has no manifest and is skipped: the newest complete one is a periodic one.
    periodic = {ckpt.checkpoint_name(s) for s in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)}
    assert newest is not None and newest.name in periodic, newest
    release_requeued(job, multi_host_cluster, not_before=release_at)
    job_state = wait_for_job(job, multi_host_cluster)
    log = job_log(tmp_path, name, job)
    assert job_state == "COMPLETED", log
    assert job_field(job, multi_host_cluster, "Restarts") == "1", log  # resumed once, not killed again
    step = int(newest.name.split("_")[1])
    assert f"resumed from {newest} at step {step}" in log, log
    assert [r["loss"] for r in read_metrics(run_dir)] == dp2_losses

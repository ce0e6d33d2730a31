"""SLURM job scripts: hostile values, and a real submission to the local one-node cluster."""

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO
from distributed import free_port, run_ranks

from imontage.checkpoint import store as ckpt
from imontage.cluster.submit import JobSpec, SubmitError, render
from imontage.config import load_recipe
from imontage.train.logger import read_metrics

HOSTILE_REJECTED = ["a\nb", "a;b", "$(touch {marker})", "`touch {marker}`", "a\rb", "x\x00y"]
HOSTILE_HARMLESS = ["a && touch {marker}", "a | touch {marker}", "a' b", 'a" b', "a > {marker}", "${{HOME}}",
                    "a b", "$HOME"]  # fmt: skip


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("value", HOSTILE_REJECTED)
@pytest.mark.parametrize("where", ["override", "recipe", "job_name", "time", "log_dir", "env_hook"])
def test_values_that_could_inject_are_rejected(value: str, where: str, tmp_path: Path) -> None:
    value = value.format(marker=tmp_path / "marker")
    spec = JobSpec(recipe="r.yaml")
    if where == "override":
        spec.overrides = [f"train.note={value}"]
    else:
        setattr(spec, where, value)
    with pytest.raises(SubmitError):
        render(spec)


@pytest.mark.parametrize("value", HOSTILE_HARMLESS)
def test_other_values_are_quoted_and_reach_the_trainer_verbatim(value: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    value = value.format(marker=marker)
    argv_file = tmp_path / "argv.json"
    fake_python = executable(
        tmp_path / "python",
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\n",
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", '#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    override = f"train.note={value}"
    spec = JobSpec(
        recipe=f"my {value}.yaml", python=str(fake_python), overrides=[override], log_dir=str(tmp_path)
    )
    script = tmp_path / "job.sh"
    script.write_text(render(spec))
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_NTASKS": "1"}  # fmt: skip
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert json.loads(argv_file.read_text()) == ["-m", "imontage.train.cli", f"my {value}.yaml", override]
    assert not marker.exists()


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize(
    ("trainer_status", "scontrol_status", "script_status", "requeued"),
    [(75, 0, 0, True), (75, 1, 75, False), (76, 0, 76, False), (0, 0, 0, False), (1, 0, 1, False)],
    ids=["requeue", "requeue-fails", "stopped", "done", "failed"],
)
def test_the_job_script_requeues_after_srun_returns_75(
    nodes: int, trainer_status: int, scontrol_status: int, script_status: int, requeued: bool, tmp_path: Path
) -> None:
    """Only the job script runs `scontrol requeue`, and only once srun (every task) has exited 75."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", f"#!/bin/sh\necho srun >> {calls}\nexit {trainer_status}\n")
    executable(
        bin_dir / "scontrol",
        f'#!/bin/sh\n[ "$1" = show ] && echo node1 && exit 0\necho "scontrol $*" >> {calls}\nexit {scontrol_status}\n',
    )
    script = tmp_path / "job.sh"
    script.write_text(render(JobSpec(recipe="r.yaml", nodes=nodes, log_dir=str(tmp_path))))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node1"}  # fmt: skip
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == script_status, done.stdout + done.stderr
    expected = ["srun", "scontrol requeue 7"] if trainer_status == 75 else ["srun"]
    assert calls.read_text().splitlines() == expected
    assert ("job 7 requeued" in done.stdout) is requeued


def test_render_checks_numbers_and_names() -> None:
    with pytest.raises(SubmitError, match="--nodes: 0"):
        render(JobSpec(recipe="r.yaml", nodes=0))
    with pytest.raises(SubmitError, match="--time: '1 day'"):
        render(JobSpec(recipe="r.yaml", time="1 day"))
    with pytest.raises(SubmitError, match="override: 'lr'"):
        render(JobSpec(recipe="r.yaml", overrides=["lr"]))
    script = render(JobSpec(recipe="r.yaml", nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00"))
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --signal=USR2@90" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --partition=gpu" in script and "scontrol show hostnames" in script


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The local one-node cluster (slurm/local_cluster.sh), on free ports, stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    # Jobs take the submitting environment: their ranks use one thread each, as the ranks of
    # run_ranks and torchrun do, so that a job's losses can equal a run_ranks reference bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURMCTLD_PORT": str(free_port()),
           "SLURMD_PORT": str(free_port())}  # fmt: skip
    result = subprocess.run(
        ["bash", "slurm/local_cluster.sh", "start", str(state)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode == 3:  # the script's code for "cannot install slurm-wlm here"
        pytest.skip(f"no local SLURM: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", "slurm/local_cluster.sh", "stop", str(state)], cwd=REPO, check=False)


def wait_for_job(job: str, env: dict[str, str], timeout: float = 240.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        state = next((f.split("=")[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job} did not finish within {timeout:.0f} s")


@pytest.mark.slow
def test_submit_runs_a_recipe_on_the_local_cluster(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(data), "--samples", "12", "--no-progress"],
                   cwd=REPO, check=True)  # fmt: skip
    run_dir = tmp_path / "run"
    submit = [
        sys.executable, "tools/submit.py", "configs/recipes/quickstart.yaml", "--time", "10",
        "--log-dir", str(tmp_path / "logs"), "--job-name", "imontage-test",
        f"run_dir={run_dir}", f"data.shards={data}/train-*.tar", "stages.sft.steps=3", "data.batch_size=2",
        "train.sample.every=0", "train.progress=false",
    ]  # fmt: skip
    result = subprocess.run(submit, cwd=REPO, env=slurm_cluster, capture_output=True, text=True, check=True)
    job = result.stdout.split()[-1]
    state = wait_for_job(job, slurm_cluster)
    log = next((tmp_path / "logs").glob(f"imontage-test-{job}.out")).read_text()
    assert state == "COMPLETED", log
    assert f"job {job} restart 0: 1 tasks" in log
    latest = ckpt.find_resume_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == "step_000003"


def job_field(job: str, env: dict[str, str], name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(f"{name}=")), "")


def wait_for_step(run_dir: Path, step: int, job: str, env: dict[str, str], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_metrics(run_dir)) >= step:
            return
        if job_field(job, env, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            raise AssertionError(f"job {job} ended before step {step}")
        time.sleep(0.5)
    raise TimeoutError(f"job {job} did not reach step {step} within {timeout:.0f} s")


REQUEUE_RELEASE_DELAY_S = 3  # > 1 s: the requeued run's credential must be newer than the revocation


def release_requeued(job: str, env: dict[str, str], timeout: float = 120.0, not_before: float = 0.0) -> None:
    """SLURM holds a requeued job (Reason=BeginTime) for two minutes; the test makes it eligible a
    few seconds on, and not before ``not_before`` (a ``time.time()``).

    It waits for ``Reason=BeginTime`` itself: right after the requeue the job can be PENDING with
    ``Reason=None`` for a moment, and a release that gave up then left it held the two minutes.
    Not at once: slurmd refuses a launch whose credential is not newer, in whole seconds, than the
    revocation of the job's previous run (``cred->ctime <= revoked``: "Job credential revoked",
    "Killing non-startable batch JobId" in slurmctld.log), so a job released at once was at times
    started within that second and ended FAILED. A few seconds on, the new credential is newer.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job_field(job, env, "JobState") == "PENDING" and job_field(job, env, "Reason") == "BeginTime":
            at = max(time.time() + REQUEUE_RELEASE_DELAY_S, not_before)
            start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at))
            subprocess.run(["scontrol", "update", f"JobId={job}", f"StartTime={start}"], env=env, check=True)
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job} was not requeued within {timeout:.0f} s")


def fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The live weights of a ZeRO-3 checkpoint, consolidated by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def uninterrupted(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    from imontage.train.trainer import train

    run_dir = train(load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides))
    return [r["loss"] for r in read_metrics(run_dir)] if rank == 0 else []


@pytest.mark.slow
def test_usr2_preemption_saves_requeues_and_resumes_exactly(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(data), "--samples", "48", "--no-progress"],
                   cwd=REPO, check=True)  # fmt: skip
    steps = 24
    common = [f"data.shards={data}/train-*.tar", f"stages.sft.steps={steps}", "data.max_tokens=768",
              "parallel=zero3_dp2", "parallel.device=cpu", "train.sample.every=0", "train.progress=false",
              "train.checkpoint.every=0"]  # fmt: skip
    run_dir = tmp_path / "run"
    submit = [sys.executable, "tools/submit.py", "configs/recipes/quickstart.yaml", "--time", "10",
              "--gpus-per-node", "2", "--log-dir", str(tmp_path / "logs"), "--job-name", "imontage-preempt",
              f"run_dir={run_dir}", *common]  # fmt: skip
    result = subprocess.run(submit, cwd=REPO, env=slurm_cluster, capture_output=True, text=True, check=True)
    job = result.stdout.split()[-1]
    wait_for_step(run_dir, 6, job, slurm_cluster)
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster, check=True)
    release_requeued(job, slurm_cluster)
    state = wait_for_job(job, slurm_cluster, timeout=480)
    log = next((tmp_path / "logs").glob(f"imontage-preempt-{job}.out")).read_text()
    assert state == "COMPLETED", log
    assert f"job {job} restart 0: 2 tasks" in log and f"job {job} restart 1: 2 tasks" in log, log
    assert "SIGUSR2 received here" in log and "requeued" in log.lower(), log
    assert job_field(job, slurm_cluster, "Restarts") == "1"

    reference_dir = tmp_path / "reference"
    expected = run_ranks(uninterrupted, 2, [f"run_dir={reference_dir}", *common], timeout=300)[0]
    assert [r["loss"] for r in read_metrics(run_dir)] == expected  # the losses after the resume too
    final = ckpt.checkpoint_name(steps)
    weights, reference = (
        fp32_weights(run_dir / "checkpoints" / final),
        fp32_weights(reference_dir / "checkpoints" / final),
    )
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name

"""SIGKILL under torchrun on 2 ZeRO-3 ranks: a rank lost mid-step, and ranks killed mid-save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from imontage.checkpoint import store as ckpt
from imontage.train.logger import read_metrics

TORCHRUN = Path(sys.executable).parent / "torchrun"
TIMEOUT_S = 20  # train.faults.timeout_s: collectives after the first step


def command(run_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [
        str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(REPO / "tests/fsync_probe.py"),
        "configs/recipes/quickstart.yaml", "parallel=zero3_dp2", "parallel.device=cpu", f"run_dir={run_dir}",
        f"data.shards={data}/train-*.tar", f"stages.sft.steps={steps}", "data.max_tokens=768",
        "train.sample.every=0", "train.progress=false", "train.checkpoint.every=1",
        f"train.faults.timeout_s={TIMEOUT_S}", *extra,
    ]  # fmt: skip


def launch(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def children() -> dict[int, list[int]]:
    """Every live process's children, from /proc/<pid>/stat."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def worker_of_rank(parent: int, rank: int) -> int:
    """The torchrun worker whose environment says RANK=rank."""
    for pid in descendants(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError):
            continue
        if f"RANK={rank}".encode() in environ and f"LOCAL_RANK={rank}".encode() in environ:
            return pid
    raise LookupError(f"no worker of rank {rank} under {parent}")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(out), "--samples", "32", "--no-progress"],
                   cwd=REPO, check=True)  # fmt: skip
    return out


@pytest.mark.slow
def test_a_rank_killed_mid_step_ends_the_job_within_the_timeout(tmp_path: Path, data: Path) -> None:
    run_dir = tmp_path / "run"
    job = launch(command(run_dir, data, 200))
    deadline = time.monotonic() + 180
    while len(read_metrics(run_dir)) < 3:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.2)
    family = descendants(job.pid)
    os.kill(worker_of_rank(job.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    try:
        job.wait(timeout=TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError(f"the job outlived the lost rank by more than {TIMEOUT_S + 30} s") from None
    elapsed = time.monotonic() - killed
    assert job.returncode != 0
    time.sleep(1)
    assert [pid for pid in family if alive(pid)] == [], "orphaned processes"
    print(f"job ended {elapsed:.1f} s after the kill, exit {job.returncode}")


def newest_complete(root: Path) -> Path | None:
    complete = []
    for path in root.glob("step_*"):
        try:
            ckpt.verify_checkpoint(path)
            complete.append(path)
        except ckpt.CheckpointError:
            pass
    return max(complete, key=lambda p: p.name, default=None)


@pytest.mark.slow
def test_ranks_killed_mid_save_resume_from_the_newest_complete_checkpoint(tmp_path: Path, data: Path) -> None:
    steps, log = 4, tmp_path / "fsyncs.log"
    reference = tmp_path / "reference"
    result = subprocess.run(command(reference, data, steps), cwd=REPO, env={**os.environ, "FSYNC_LOG": str(log)},
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = [r["loss"] for r in read_metrics(reference)]
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    in_second_save = [(int(i), p) for i, p in calls if "step_000002" in p]
    staged = next(i for i, p in in_second_save if Path(p).name.startswith(".tmp-step_000002"))
    points = {  # rank 0's fsync number -> where the save was when rank 0 was killed
        "rank files written": next(i for i, p in in_second_save if p.endswith(".safetensors")),
        "manifest written, not renamed": staged,
        "renamed, latest replaced": staged + 2,  # the fsyncs of the rename, then of `latest`
    }
    for where, index in points.items():
        run_dir = tmp_path / where.replace(" ", "_")
        killed = subprocess.run(command(run_dir, data, steps), cwd=REPO, env={**os.environ, "KILL_AT_FSYNC": str(index)},
                                capture_output=True, text=True, timeout=240)  # fmt: skip
        assert killed.returncode != 0, f"{where}: the kill did not happen"
        newest = newest_complete(run_dir / "checkpoints")
        assert newest is not None and newest.name in ("step_000001", "step_000002"), where
        restarted = subprocess.run(
            command(run_dir, data, steps), cwd=REPO, capture_output=True, text=True, timeout=240
        )
        assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
        assert (
            f"resumed from {newest} at step {ckpt.checkpoint_step(newest)}"
            in restarted.stdout + restarted.stderr
        )
        assert [r["loss"] for r in read_metrics(run_dir)] == expected, where

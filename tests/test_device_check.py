"""tools/device_check.sh, the GPU check, in its ``--cpu`` mode: the script must not rot between GPU loans.

Only the steps no other test runs the way the script does: the kernels of
tests/test_rope_kernel_device.py through the interpreter, and ``imontage-train`` under ``torchrun`` with
ZeRO-3 followed by ``convert_checkpoint.py consolidate``. The benchmark steps run the files of
tests/benchmarks/ unchanged (``make bench``); ``tools/device_check.sh --cpu DIR`` runs them all.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_cpu_mode_runs_the_kernel_and_training_steps(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        ["bash", "tools/device_check.sh", "--cpu", str(out), "--steps", "kernels,train", "--scratch", str(tmp_path / "scratch")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The table comes last, one row per step, and the same figures are in summary.csv.
    table = result.stdout.rstrip().splitlines()
    assert table[-2].startswith("| kernels | ok |") and table[-1].startswith("| train | ok |"), table[-4:]
    assert (out / "summary.md").read_text().splitlines()[-2:] == table[-2:]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    figures = {(r["step"], r["item"]): r["value"] for r in rows}
    passed, failed = figures[("kernels", "tests")].split(", ")[:2]
    assert int(passed.split()[0]) >= 8 and failed == "0 failed", figures
    assert figures[("train", "losses")].startswith("6 steps"), figures
    assert "all finite" in figures[("train", "consolidated")], figures
    for log in ("kernels.log", "kernels.xml", "train.log"):
        assert (out / log).stat().st_size > 0

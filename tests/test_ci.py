"""The CI entry point and the tools that print facts users rely on."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_ci_run_fails_when_no_test_runs(tmp_path: Path) -> None:
    """`.ci/run` calls `make test`; pytest exits 5 on an empty collection, and CI must fail then."""
    empty = tmp_path / "no_tests"
    empty.mkdir()
    env = {**os.environ, "TESTS": str(empty), "VENV": sys.prefix}
    result = subprocess.run(
        ["bash", ".ci/run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "no tests ran" in result.stdout


def test_count_params_tool_prints_every_preset() -> None:
    result = subprocess.run(
        [sys.executable, "tools/count_params.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    presets = sorted(p.stem for p in (REPO / "configs/model").glob("*.yaml"))
    assert [line.split()[0] for line in lines[1:]] == presets
    for line in lines[1:]:
        assert abs(float(line.split()[-1].rstrip("%"))) <= 3.0, line

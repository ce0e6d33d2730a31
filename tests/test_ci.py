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
    # Not make's own variables: under `make test TESTS=...` they would carry that TESTS (a command
    # line variable wins over the environment) into the inner make, which would run this test again.
    outer_make = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {
        **{k: v for k, v in os.environ.items() if k not in outer_make},
        "TESTS": str(empty),
        "VENV": sys.prefix,
    }
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
    stated = [line for line in lines[1:] if line.split()[-1] != "-"]  # tiny presets claim no size
    assert len(stated) >= len(presets) - 3
    for line in stated:
        assert abs(float(line.split()[-1].rstrip("%"))) <= 3.0, line


def test_the_kernels_folder_never_shadows_the_installed_kernels_package() -> None:
    """With the root on sys.path (``python -c`` from it), ``import kernels`` is the PyPI package,
    which diffusers' model imports need; imontage's kernels stay importable as imontage.kernels."""
    code = "import kernels, imontage.kernels.rope as rope; print(kernels.__file__); print(rope.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    pypi, ours = result.stdout.splitlines()
    assert "site-packages" in Path(pypi).parts, pypi
    assert Path(ours).resolve() == REPO / "kernels/rope/__init__.py"

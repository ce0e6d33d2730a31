"""The RoPE kernels against the oldest Triton the project supports (3.6: what the lent GPU machines run).

The suite itself runs on this environment's Triton (3.9 in CI). ``make triton36-env`` lays Triton 3.6 over
the same torch in ``.venv-triton36`` (put first on ``PYTHONPATH``; a CPU torch needs no triton), and this
test runs a share of tests/test_rope_kernel.py there in a child process: the sm_90 compile of every kernel
and the Wan-shaped and 4D fused cases through the interpreter, forward and backward.

``make test`` builds that folder first and names it in ``IMONTAGE_TRITON36_ENV``, so there the test fails
when the folder is missing; run on its own without the variable, it skips when ``.venv-triton36`` is not
built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TRITON36_SELECTION = "sm90 or D128-bands22.21.21 or D128-bands8.16.20.20-N37"


def triton36_env() -> Path:
    named = os.environ.get("IMONTAGE_TRITON36_ENV")
    env = Path(named) if named else REPO / ".venv-triton36"
    if not (env / "triton").is_dir():
        if named:
            pytest.fail(f"IMONTAGE_TRITON36_ENV={named} holds no triton: `make triton36-env` builds it")
        pytest.skip("Triton 3.6 is not laid out in .venv-triton36: `make triton36-env` builds it")
    return env


def test_rope_kernels_pass_under_triton_36() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(triton36_env()), str(REPO / "tests")])}
    env.pop("TRITON_INTERPRET", None)  # the sm_90 compile needs triton imported in compiled mode
    version = subprocess.run(
        [sys.executable, "-c", "import numpy, triton; print(triton.__version__, numpy.__version__)"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split()  # fmt: skip
    assert version[0].startswith("3.6."), version

    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "tests/test_rope_kernel.py", "-k", TRITON36_SELECTION,
            "-q", "-p", "no:cacheprovider", "-rs", "-W", "ignore::DeprecationWarning",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Nothing may be skipped: a skipped sm_90 compile would leave the compiled path unchecked.
    assert "skipped" not in summary and " passed" in summary, summary

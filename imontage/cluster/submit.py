"""Render and submit the SLURM job of a recipe (``tools/submit.py``).

Every value that reaches the job script is validated and shell-quoted: a value holding a
newline, ``;``, ``$(``, a backtick or another control character is refused outright, whatever
the quoting would have made of it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
_FORBIDDEN = re.compile(r"[\n\r;`]|\$\(|[\x00-\x1f\x7f]")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")  # minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


class SubmitError(ValueError):
    """A value that cannot go into a job script; the message names the option."""


def checked(option: str, value: str) -> str:
    """``value`` if it is safe to place (quoted) in a job script, else :class:`SubmitError`."""
    if _FORBIDDEN.search(value):
        raise SubmitError(
            f"{option}: {value!r} holds a newline, ';', '$(', a backtick or a control character"
        )
    return value


def _matching(option: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.match(checked(option, value)):
        raise SubmitError(f"{option}: {value!r} is not {what}")
    return value


@dataclass
class JobSpec:
    """What tools/submit.py was asked for."""

    recipe: str
    nodes: int = 1
    gpus_per_node: int = 1  # tasks per node; on a CPU cluster, the CPU ranks per node
    cpus_per_task: int = 1
    time: str = "01:00:00"
    job_name: str = "imontage"
    partition: str = ""
    account: str = ""
    max_requeues: int = 3
    log_dir: str = "runs/slurm-logs"
    env_hook: str = ""  # a script sourced before launch: site modules, conda, NCCL settings
    python: str = field(default_factory=lambda: sys.executable)
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for option, number in (("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node),
                               ("--cpus-per-task", self.cpus_per_task)):  # fmt: skip
            if number < 1:
                raise SubmitError(f"{option}: {number} must be >= 1")
        if self.max_requeues < 0:
            raise SubmitError(f"--max-requeues: {self.max_requeues} must be >= 0")
        _matching("--time", self.time, _TIME, "a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
        _matching("--job-name", self.job_name, _NAME, "a name of letters, digits, '_', '.' and '-'")
        for option, value in (("--partition", self.partition), ("--account", self.account)):
            if value:
                _matching(option, value, _NAME, "a name of letters, digits, '_', '.' and '-'")
        for option, value in (("RECIPE", self.recipe), ("--log-dir", self.log_dir), ("--env-hook", self.env_hook),
                              ("--python", self.python)):  # fmt: skip
            checked(option, value)
        for override in self.overrides:
            key, sep, _ = checked("override", override).partition("=")
            if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_.\[\]]*$", key):
                raise SubmitError(f"override: {override!r} is not key=value with a dotted key")


def render(spec: JobSpec) -> str:
    """The job script for ``spec``: the one-node or the multi-node template, filled in and quoted."""
    spec.validate()
    template = (SLURM_DIR / ("one_node.sbatch" if spec.nodes == 1 else "multi_node.sbatch")).read_text()
    extra = [f"#SBATCH --partition={spec.partition}"] if spec.partition else []
    extra += [f"#SBATCH --account={spec.account}"] if spec.account else []
    values = {
        "JOB_NAME": spec.job_name,
        "NODES": str(spec.nodes),
        "TASKS_PER_NODE": str(spec.gpus_per_node),
        "CPUS_PER_TASK": str(spec.cpus_per_task),
        "TIME": spec.time,
        # #SBATCH lines are read by sbatch, not the shell: the log folder is validated, not quoted there.
        "LOG_DIR": spec.log_dir,
        "SBATCH_EXTRA": "\n".join(extra),
        "ENV_HOOK": f"source {shlex.quote(spec.env_hook)}" if spec.env_hook else "# no environment hook",
        "MAX_REQUEUES": str(spec.max_requeues),
        "PYTHON": shlex.quote(spec.python),
        "RECIPE": shlex.quote(spec.recipe),
        "OVERRIDES": " ".join(shlex.quote(o) for o in spec.overrides),
    }
    if any(c.isspace() for c in spec.log_dir):
        raise SubmitError(
            f"--log-dir: {spec.log_dir!r} holds white space, which #SBATCH --output cannot take"
        )
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def submit(script: str, log_dir: str) -> str:
    """``sbatch`` the script (on standard input); returns the job id."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["sbatch", "--parsable"], input=script, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]

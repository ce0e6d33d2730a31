"""The GPU check of issue 19 in one go: kernels, benchmarks, a training run; a short table last.

    python tools/device_check.py OUT_DIR [--cpu] [--steps kernels,train,rope,wan_step,train_step,family_step]
        [--budget-s 450] [--scratch DIR]

Run it through ``tools/device_check.sh`` on a lent GPU machine (which installs the wheels it needs first;
docs/performance.md, "GPU check"). Each step is a child process of its own, with its log in OUT_DIR:

- ``kernels``: tests/test_rope_kernel_device.py, the RoPE and fused QK-norm + RoPE kernels compiled for
  the GPU, forward and backward, fp32 and bf16, against float64 (``kernels.xml``: JUnit).
- ``train``: ``imontage-train`` on the quickstart recipe under ``torchrun`` on one process, DeepSpeed
  ZeRO-3 (NCCL on a GPU, gloo on a CPU), bf16 on a GPU; its losses must be finite and falling, and its
  last checkpoint must consolidate (``tools/convert_checkpoint.py consolidate``) into finite weights.
- ``rope``, ``wan_step``, ``train_step``: the benchmarks of tests/benchmarks/ as they are
  (``test_rope_bench.py``: bf16 ``[1, 75600, 40, 128]``, ``[1, 27030, 24, 128]`` and 2,000 packed
  sequences against a device copy, ``torch.compile`` of the reference and the unfused pair;
  ``test_wan_step_bench.py``: ``wan2.1_t2v_1.3b`` bf16 at 16k and 32k video tokens against diffusers;
  ``test_train_step_bench.py``: ``dit_1b`` MFU), with fewer repeats so that all fits in the budget;
  their CSVs land in OUT_DIR.
- ``family_step``: ``test_family_step_bench.py``, Wan 2.2 TI2V-5B, an A14B expert and HunyuanVideo 1.5
  I2V bf16 at 16k video tokens against diffusers (blocks cut so both models fit), 2 repeats; last, so
  that the budget leaves it out before the others.

``--cpu`` runs the same steps at small sizes on the CPU (kernels through Triton's interpreter) so that CI
checks the script does not rot; its figures say nothing about a GPU. Every step gets at most its own cap
and what is left of ``--budget-s``; a step that fails or runs out of time is reported and the others
still run. The exit status is 1 when a step did not pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Correctness first, then the figures: what the budget leaves out is the last.
STEPS = ("kernels", "train", "rope", "wan_step", "train_step", "family_step")


@dataclass
class Result:
    step: str
    status: str = "not run"  # ok | failed | timeout | skipped (budget) | not run
    seconds: float = 0.0
    figures: list[tuple[str, str]] = field(default_factory=list)  # (item, value) for the table and CSV


@dataclass
class Check:
    out: Path
    scratch: Path
    cpu: bool
    deadline: float

    @property
    def python(self) -> str:
        return sys.executable

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        env.pop("TRITON_INTERPRET", None)  # each step sets what it needs
        return env

    def run(self, log_name: str, command: list[str], cap_s: float, env: dict[str, str] | None = None) -> int:
        """Run ``command`` from the repository root, appending its output to OUT/log_name; its status,
        124 when it ran out of time (its cap or the budget)."""
        timeout = min(cap_s, self.deadline - time.monotonic())
        with (self.out / log_name).open("a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            if timeout < 5:
                log.write("not started: the budget is spent\n")
                return 124
            try:
                return subprocess.run(
                    command, cwd=REPO, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT,
                    timeout=timeout, check=False,
                ).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                log.write(f"\nstopped after {timeout:.0f} s\n")
                return 124

    def pytest(self, step: str, args: list[str], cap_s: float, **env: str) -> int:
        command = [self.python, "-m", "pytest", *args, "-p", "no:cacheprovider", "-rs"]
        return self.run(f"{step}.log", command, cap_s, self.env(**env))

    def bench_args(self, name: str, gpu_repeats: int, cpu_shapes: str) -> list[str]:
        size = ["--bench-size", "small", "--bench-shapes", cpu_shapes, "--bench-repeats", "1"] if self.cpu else [
            "--bench-size", "full", "--bench-repeats", str(gpu_repeats)
        ]  # fmt: skip
        return [
            f"tests/benchmarks/test_{name}_bench.py",
            "-m",
            "benchmark",
            "-s",
            "--bench-csv",
            str(self.out),
            *size,
        ]


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def status_of(code: int) -> str:
    return "ok" if code == 0 else "timeout" if code == 124 else f"failed ({code})"


# ----------------------------------------------------------------------------------------------------
# Steps: each returns its status and figures


def kernels(check: Check) -> tuple[str, list[tuple[str, str]]]:
    xml = check.out / "kernels.xml"
    env = {"IMONTAGE_KERNEL_DEVICE": "cpu"} if check.cpu else {}
    code = check.pytest(
        "kernels", ["tests/test_rope_kernel_device.py", "-q", f"--junitxml={xml}"], 240, **env
    )
    figures = []
    if xml.exists():
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        figures.append(
            (
                "tests",
                f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped",
            )
        )
    return status_of(code), figures


def rope(check: Check) -> tuple[str, list[tuple[str, str]]]:
    # On a CPU, inductor compiles in this process: its pool of compile workers can take a minute to exit.
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1"} if check.cpu else {}
    code = check.pytest("rope", check.bench_args("rope", 10, "27k"), 200, **env)
    rows = read_csv(check.out / "rope.csv")

    def value(shape: str, op: str, variant: str, direction: str, column: str) -> str:
        for r in rows:
            if (r["shape"], r["op"], r["variant"], r["direction"]) == (shape, op, variant, direction):
                return r[column]
        return ""

    figures = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        fwd, bwd = (
            value(shape, "rope", "triton", "fwd", "%copy"),
            value(shape, "rope", "triton", "bwd", "%copy"),
        )
        over_compile = value(shape, "rope", "triton", "fwd+bwd", "x compile")
        fused = value(shape, "qk_norm_rope", "triton", "fwd+bwd", "ms")
        separate = value(shape, "qk_norm_rope", "triton-separate", "fwd+bwd", "ms")
        text = f"rope fwd {fwd}% / bwd {bwd}% of copy, {over_compile}x compile"
        if fused and separate:
            text += f"; fused QK-norm+RoPE {float(separate) / float(fused):.2f}x unfused"
        figures.append((shape, text))
    packed, single = (
        value("packed2000", "rope", "triton", "fwd+bwd", "ms"),
        value("wan14b", "rope", "triton", "fwd+bwd", "ms"),
    )
    if packed and single:
        figures.append(("packed2000 / wan14b", f"{float(packed) / float(single):.3f} (rope fwd+bwd time)"))
    return status_of(code), figures


def wan_step(check: Check) -> tuple[str, list[tuple[str, str]]]:
    code = check.pytest("wan_step", check.bench_args("wan_step", 3, "16k"), 240)
    figures = []
    for r in read_csv(check.out / "wan_step.csv"):
        text = (
            f"{r['video_tokens']} tokens {r['precision']}: imontage/diffusers {r['ratio']}x, "
            f"{r['imontage_tok_s']} tok/s"
        )
        if r["imontage_mfu"]:
            text += f", MFU {float(r['imontage_mfu']):.1%} (diffusers {float(r['diffusers_mfu']):.1%})"
        if r["imontage_gib"]:
            text += f", peak {r['imontage_gib']} GiB (diffusers {r['diffusers_gib']})"
        figures.append((f"{r['model']} {r['case']}", text))
    return status_of(code), figures


def family_step(check: Check) -> tuple[str, list[tuple[str, str]]]:
    code = check.pytest("family_step", check.bench_args("family_step", 2, "a14b_expert"), 150)
    figures = []
    for r in read_csv(check.out / "family_step.csv"):
        text = f"{r['video_tokens']} tokens {r['precision']}: imontage/diffusers {r['ratio']}x"
        if r["imontage_gib"]:
            text += f", peak {r['imontage_gib']} GiB (diffusers {r['diffusers_gib']})"
        figures.append((f"{r['model']} {r['case']}", text))
    return status_of(code), figures


def train_step(check: Check) -> tuple[str, list[tuple[str, str]]]:
    code = check.pytest("train_step", check.bench_args("train_step", 5, "16k"), 120)
    figures = []
    for r in read_csv(check.out / "train_step.csv"):
        text = f"{r['tokens']} tokens {r['precision']}: {r['tokens_per_s']} tok/s, {r['tflops']} TFLOP/s"
        if r["mfu"]:
            text += f", MFU {float(r['mfu']):.1%}"
        figures.append((f"{r['model']} {r['case']}", text))
    return status_of(code), figures


def train(check: Check) -> tuple[str, list[tuple[str, str]]]:
    """imontage-train on one rank under torchrun, ZeRO-3; losses finite and falling; consolidated."""
    data, run_dir = check.scratch / "synthetic", check.scratch / "train_run"
    steps = 6 if check.cpu else 60
    code = check.run(
        "train.log",
        [check.python, "tools/make_synthetic.py", "--out", str(data), "--samples", "64", "--no-progress"],
        60,
    )
    if code:
        return status_of(code), []
    device = ["parallel.device=cpu"] if check.cpu else ["parallel.device=cuda", "train.precision=bf16"]
    code = check.run(
        "train.log",
        [
            check.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "imontage.train.cli", "configs/recipes/quickstart.yaml", "parallel=zero3_dp2", *device,
            f"run_dir={run_dir}", f"data.shards={data}/train-*.tar", f"stages.sft.steps={steps}",
            f"train.checkpoint.every={steps}", "train.sample.every=0", "train.progress=false",
            "optim.warmup_steps=2",
        ],
        150,
    )  # fmt: skip
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    figures = []
    if losses:
        third = max(1, len(losses) // 3)
        first, last = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
        figures.append(("losses", f"{len(losses)} steps, {losses[0]:.4g} -> {losses[-1]:.4g}"))
        if not all(math.isfinite(x) for x in losses) or not last < first or len(losses) != steps:
            figures.append(("problem", f"losses not finite and falling (mean {first:.4g} -> {last:.4g})"))
            code = code or 1
    if code:
        return status_of(code), figures
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    consolidated = check.scratch / "consolidated.safetensors"
    code = check.run(
        "train.log",
        [check.python, "tools/convert_checkpoint.py", "consolidate", str(run_dir / "checkpoints" / latest),
         str(consolidated), "--weights", "live"],
        60,
    )  # fmt: skip
    if code == 0:
        tensors, finite = consolidated_tensors(consolidated)
        figures.append(
            ("consolidated", f"{latest}: {tensors} tensors, {'all finite' if finite else 'NOT FINITE'}")
        )
        code = 0 if finite and tensors > 0 else 1
    return status_of(code), figures


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def consolidated_tensors(path: Path) -> tuple[int, bool]:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return len(tensors), all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


STEP_FUNCTIONS: dict[str, Callable[[Check], tuple[str, list[tuple[str, str]]]]] = {
    "kernels": kernels, "rope": rope, "wan_step": wan_step, "train_step": train_step, "train": train,
    "family_step": family_step,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Environment, table, CSV


def describe_environment(check: Check) -> str:
    code = (
        "import torch, triton; d = torch.cuda.is_available();"
        "print(f'torch {torch.__version__}, triton {triton.__version__}, '"
        "     + (f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})' if d else 'no GPU'))"
    )
    result = subprocess.run([check.python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    line = result.stdout.strip() or f"(versions unreadable: {result.stderr.strip()[-200:]})"
    return f"{line}; Python {platform.python_version()}; {'--cpu' if check.cpu else 'GPU'} mode"


def write_outputs(check: Check, results: list[Result], environment: str, started: str) -> str:
    with (check.out / "summary.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "status", "seconds", "item", "value"])
        for r in results:
            for item, value in r.figures or [("", "")]:
                writer.writerow([r.step, r.status, f"{r.seconds:.1f}", item, value])
    lines = [
        f"GPU check {started}: {environment}",
        "",
        "| step | status | s | figures |",
        "| --- | --- | ---: | --- |",
    ]
    for r in results:
        figures = "; ".join(f"{item}: {value}" for item, value in r.figures) or "-"
        lines.append(f"| {r.step} | {r.status} | {r.seconds:.0f} | {figures} |")
    table = "\n".join(lines) + "\n"
    (check.out / "summary.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the logs, CSVs and summary")
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU (CI)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all steps")
    parser.add_argument(
        "--scratch", type=Path, default=None, help="folder for the run's data (default: temp)"
    )
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="device_check_"))
    check = Check(args.out.resolve(), scratch.resolve(), args.cpu, time.monotonic() + args.budget_s)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    environment = describe_environment(check)
    print(environment, flush=True)

    results = []
    for name in steps:
        result = Result(name)
        began = time.monotonic()
        if check.deadline - began < 10:
            result.status = "skipped (budget)"
        else:
            print(f"[{name}] ...", flush=True)
            try:
                result.status, result.figures = STEP_FUNCTIONS[name](check)
            except Exception as e:  # a step's outputs not as expected: report it, run the others
                result.status, result.figures = "failed (check)", [("error", f"{type(e).__name__}: {e}")]
        result.seconds = time.monotonic() - began
        print(
            f"[{name}] {result.status} in {result.seconds:.0f} s (log: {check.out / (name + '.log')})",
            flush=True,
        )
        results.append(result)
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(write_outputs(check, results, environment, started), end="")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

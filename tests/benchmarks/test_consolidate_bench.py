"""Checkpoint conversion benchmark: ``consolidate`` against DeepSpeed's ``zero_to_fp32``, one ZeRO-3 checkpoint.

    pytest tests/benchmarks/test_consolidate_bench.py -m benchmark -s [--bench-size small|full]
        [--bench-csv runs/bench]

The checkpoint is written by the DeepSpeed backend on 2 gloo ranks (``parallel=zero3_dp2``, CPU)
right after ``deepspeed.initialize``, with no training step: ZeRO-3 fp32 partitions of a freshly
initialised model, no EMA. ``full``: ``dit_1b`` cut to 6 blocks, about 1.24 GB of fp32 weights
(the acceptance size; a few minutes on 2 cores, about 6 GB of RAM at most). ``small`` (the
default without CUDA): ``dit_tiny``, a check of the harness whose figures mean nothing.

Each conversion runs in its own child process, which reports its resident set after its imports
(``VmRSS``, the baseline) and its peak resident set at the end (``VmHWM``: the kernel's high-water
mark of the child's own address space; ``ru_maxrss`` of a child is no use here, Linux carries the
parent's high-water mark into it across fork and exec). The conversion's own memory is peak minus
baseline, set against the largest tensor of the model. Rows:

- ``zero_to_fp32``: DeepSpeed's ``convert_zero_checkpoint_to_fp32_state_dict`` writing one
  safetensors file (``safe_serialization=True``, unsharded);
- ``consolidate``: ``imontage.checkpoint.convert.consolidate(weights="live", verify=False)``;
- ``consolidate+verify``: the same with the sha256 check of every input file (the CLI's default).

The files are read once beforehand so that every row reads from the page cache. The two
outputs are compared tensor for tensor.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.benchmark

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs/recipes/quickstart.yaml"
SIZES = {
    "full": ["model=dit_1b", "model.depth=6"],
    "small": ["model=dit_tiny"],
}

# Run as `python -c CHILD TOOL CHECKPOINT OUT` with the repository root as working directory.
CHILD = """
import json, sys, time
from pathlib import Path

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

tool, checkpoint, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if tool == "zero_to_fp32":
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
else:
    from imontage.checkpoint import convert
baseline = status("VmRSS")
started = time.perf_counter()
if tool == "zero_to_fp32":
    convert_zero_checkpoint_to_fp32_state_dict(
        str(checkpoint.parent), str(out), max_shard_size=None, safe_serialization=True, tag=checkpoint.name
    )
else:
    convert.consolidate(checkpoint, out / "model.safetensors", weights="live", verify=tool.endswith("verify"))
seconds = time.perf_counter() - started
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "seconds": seconds}))
"""


def save_initialised(rank: int, world_size: int, options: list[str], root: str) -> str:
    """One rank: build the DeepSpeed backend and save a checkpoint of step 0 at once."""
    from omegaconf import OmegaConf

    from imontage.config import load_recipe
    from imontage.models.dit.model import build_dit
    from imontage.train.backends import build_backend

    cfg = load_recipe(RECIPE, options)
    torch.manual_seed(cfg.seed)
    backend = build_backend(build_dit(cfg.model), cfg, torch.device("cpu"))
    shared = {"step": 0, "stage_index": 0, "stage_name": "init",
              "model_config": OmegaConf.to_container(cfg.model, resolve=True)}  # fmt: skip
    path = backend.save(Path(root), 0, shared, {"loader": {}, "rng": {}}, {}, keep_last=1)
    backend.close()
    return str(path)


def make_checkpoint(root: Path, size: str) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from distributed import run_ranks

    options = [*SIZES[size], "parallel=zero3_dp2", "parallel.device=cpu", f"run_dir={root}",
               "train.ema_decay=0"]  # fmt: skip
    return Path(run_ranks(save_initialised, 2, options, str(root / "checkpoints"), timeout=900)[0])


def run_tool(tool: str, checkpoint: Path, out: Path) -> dict:
    """``tool`` in a child process: its conversion time, baseline and peak resident set (bytes)."""
    out.mkdir(parents=True)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, tool, str(checkpoint), str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert child.returncode == 0, f"{tool} failed ({child.returncode}): {child.stderr[-2000:]}"
    values = json.loads(child.stdout.strip().splitlines()[-1])
    return {"tool": tool, "seconds": round(values["seconds"], 2),
            "process_s": round(time.perf_counter() - started, 2), "baseline_rss": values["baseline"],
            "peak_rss": values["peak"], "increase": values["peak"] - values["baseline"]}  # fmt: skip


def output_file(out: Path) -> Path:
    (found,) = out.glob("*.safetensors")
    return found


def test_consolidate_against_zero_to_fp32(bench_options: dict, tmp_path: Path) -> None:
    from imontage.checkpoint import convert
    from imontage.checkpoint import store as ckpt

    size = bench_options["size"]
    started = time.perf_counter()
    checkpoint = make_checkpoint(tmp_path / "run", size)
    build_s = time.perf_counter() - started
    ckpt.verify_checkpoint(checkpoint)  # reads every file: the rows below read from the page cache
    reader, cfg = convert.open_zero3(checkpoint)
    shapes = reader.expected
    weights = sum(4 * math.prod(shape) for shape in shapes.values())
    largest = max(shapes, key=lambda name: math.prod(shapes[name]))
    largest_bytes = 4 * math.prod(shapes[largest])
    files = sum(p.stat().st_size for p in checkpoint.iterdir())

    rows = [
        run_tool(tool, checkpoint, tmp_path / tool)
        for tool in ("zero_to_fp32", "consolidate", "consolidate+verify")
    ]
    ours, theirs = output_file(tmp_path / "consolidate"), output_file(tmp_path / "zero_to_fp32")
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():  # noqa: SIM118 (safe_open has no iterator)
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name

    for row in rows:
        row.update(size=size, weights_bytes=weights, checkpoint_bytes=files, largest_tensor=largest,
                   largest_bytes=largest_bytes, increase_over_largest=round(row["increase"] / largest_bytes, 3))  # fmt: skip
    path = Path(bench_options["csv_dir"]) / "consolidate.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mib = 2**20
    print(f"\ncheckpoint: {checkpoint} ({files / mib:,.0f} MiB on disk, written in {build_s:.0f} s), "
          f"{weights / mib:,.0f} MiB of fp32 weights, largest tensor {largest} {list(shapes[largest])} "
          f"= {largest_bytes / mib:,.1f} MiB")  # fmt: skip
    print(f"{'tool':<20}{'conversion s':>14}{'process s':>11}{'baseline MiB':>14}{'peak MiB':>10}"
          f"{'peak-baseline MiB':>19}{'/ largest':>11}")  # fmt: skip
    for row in rows:
        print(f"{row['tool']:<20}{row['seconds']:>14.2f}{row['process_s']:>11.2f}"
              f"{row['baseline_rss'] / mib:>14.0f}{row['peak_rss'] / mib:>10.0f}"
              f"{row['increase'] / mib:>19.1f}{row['increase_over_largest']:>11.2f}")  # fmt: skip
    print(f"written: {path}")
    if size == "full":
        consolidate = next(row for row in rows if row["tool"] == "consolidate")
        assert consolidate["increase"] < 1.5 * largest_bytes  # the writer has no buffer of its own

"""Benchmark of the fused multi-axis RoPE kernels against the PyTorch reference (issue 4).

    pytest tests/benchmarks/test_rope_bench.py -m benchmark -s [--bench-size small|full]
        [--bench-shapes wan14b,27k,packed2000] [--bench-repeats 20] [--bench-csv runs/bench]

For every shape, and for the rotation alone (``rope``) and per-head RMSNorm + rotation
(``qk_norm_rope``), it times forward, backward and forward+backward of:

- ``triton``: the fused kernel (``imontage.kernels.rope``); for ``qk_norm_rope`` also
  ``triton-separate``: ``F.rms_norm`` then the rotation kernel, the unfused pair the fused kernel replaces;
- ``eager``: the reference the tests use, ``imontage.models.common.rope.apply_rope`` (after ``F.rms_norm``);
- ``compile``: ``torch.compile`` of that reference (inductor).

Bandwidth counts the bytes an op must move (q and k read and written, plus positions and weights; the
norm's backward also reads the forward input), the same for every variant, so GB/s compares like with
like; ``copy`` is a device-to-device copy of q and k's bytes measured in the same run (the best of
10× the repeats: the ceiling), and ``%copy`` the fraction of its bandwidth. Other times are medians. ``x eager`` and ``x compile`` are speedups (their time / this time).

On CPU (``--bench-size small``, the default without CUDA) the kernels run through Triton's interpreter,
so their times measure the interpreter; the table checks the harness, not the kernel. PyTorch runs
single-threaded there, for stable times.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from imontage.kernels.rope import multi_axis_rope, qk_norm_rope
from imontage.kernels.rope.reference import apply_rope

pytestmark = pytest.mark.benchmark

BANDS = (0, 22, 21, 21)  # DESIGN.md's 3D default on the model's four axes (s, t, h, w)
THETA = (10000.0,) * 4
EPS = 1e-6


@dataclass(frozen=True)
class Shape:
    """q and k ``[batch, tokens, heads, head_dim]`` bf16; ``sequences`` > 1 packs them as [N, H, D]."""

    name: str
    tokens: int
    heads: int
    grid_hw: tuple[int, int]  # video rows × columns; frames follow from the token count
    sequences: int = 1
    head_dim: int = 128

    def scaled(self) -> Shape:
        """The CPU-sized version: 1/200 of the tokens (and sequences), 1/5 of the heads and grid."""
        h, w = self.grid_hw
        return Shape(
            self.name,
            self.tokens // 200,
            max(1, self.heads // 5),
            (max(1, h // 5), max(1, w // 5)),
            max(1, self.sequences // 200),
            self.head_dim,
        )


SHAPES = [
    Shape("wan14b", 75600, 40, (45, 80)),  # Wan-14B-like 720p clip: 21 × 45 × 80 latent patches
    Shape("27k", 27030, 24, (30, 53)),  # 17 × 30 × 53
    Shape("packed2000", 75600, 40, (4, 4), sequences=2000),  # wan14b's tokens as 2000 short clips
]


def video_positions(tokens: int, grid_hw: tuple[int, int]) -> Tensor:
    """``[tokens, 4]`` int32 (s, t, h, w) of a clip filled frame by frame, row by row."""
    h, w = grid_hw
    n = torch.arange(tokens)
    return torch.stack([torch.zeros_like(n), n // (h * w), (n // w) % h, n % w], dim=1).to(torch.int32)


def shape_positions(shape: Shape) -> Tensor:
    """One clip, or ``sequences`` clips of near-equal length whose positions restart at 0."""
    lengths = [len(c) for c in torch.arange(shape.tokens).tensor_split(shape.sequences)]
    return torch.cat([video_positions(n, shape.grid_hw) for n in lengths])


def reference_rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The test oracle (``apply_rope``) on [.., H, D] tensors: it takes tokens flattened."""
    pos = positions.reshape(-1, positions.shape[-1])
    q_out = apply_rope(q.reshape(-1, *q.shape[-2:]), pos, BANDS, THETA)
    k_out = apply_rope(k.reshape(-1, *k.shape[-2:]), pos, BANDS, THETA)
    return q_out.view(q.shape), k_out.view(k.shape)


def reference_qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    head_dim = q.shape[-1]
    return reference_rope(
        F.rms_norm(q, (head_dim,), q_weight, EPS), F.rms_norm(k, (head_dim,), k_weight, EPS), positions
    )


def kernel_rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    return multi_axis_rope(q, k, positions, BANDS, THETA)


def kernel_qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    return qk_norm_rope(q, k, q_weight, k_weight, positions, BANDS, THETA, eps=EPS)


def separate_qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    head_dim = q.shape[-1]
    return kernel_rope(
        F.rms_norm(q, (head_dim,), q_weight, EPS), F.rms_norm(k, (head_dim,), k_weight, EPS), positions
    )


class Timer:
    """Median (or best) wall time of a callable: CUDA events on a GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int, best: bool = False) -> None:
        self.device, self.repeats, self.warmup, self.best = device, repeats, warmup, best

    def __call__(self, fn: Callable[[Any], object], setup: Callable[[], Any] = lambda: None) -> float:
        """Seconds of ``fn(setup())``, ``setup`` untimed (e.g. the forward whose backward is timed)."""
        for _ in range(self.warmup):
            fn(setup())
        times = []
        for _ in range(self.repeats):
            state = setup()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn(state)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(state)
                times.append(time.perf_counter() - t0)
        return min(times) if self.best else statistics.median(times)


def copy_seconds(timer: Timer, elements: int, device: torch.device, dtype: torch.dtype) -> float:
    """A device-to-device copy of ``elements`` values: the bandwidth a memory-bound op can reach."""
    src = torch.randn(elements, device=device).to(dtype)
    dst = torch.empty_like(src)
    return timer(lambda _: dst.copy_(src))


def time_directions(
    timer: Timer, fn: Callable[..., tuple[Tensor, Tensor]], inputs: list[Tensor], positions: Tensor
) -> dict[str, float]:
    """Seconds for forward (no grad), backward (of an untimed forward) and forward+backward."""
    grads = [torch.randn_like(t) for t in inputs[:2]]  # upstream gradients of q_out, k_out
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.no_grad():
        forward = timer(lambda _: fn(*inputs, positions))
    backward = timer(
        lambda outputs: torch.autograd.grad(outputs, leaves, grads), lambda: fn(*leaves, positions)
    )
    both = timer(lambda _: torch.autograd.grad(fn(*leaves, positions), leaves, grads))
    return {"fwd": forward, "bwd": backward, "fwd+bwd": both}


def test_rope_benchmark(
    bench_options: dict, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # else CPU tensors would take the reference path
        # One intra-op thread: on a small shared VM, waking a second one costs milliseconds at random.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    full = bench_options["size"] == "full"
    shapes = [s if full else s.scaled() for s in SHAPES]
    if bench_options["shapes"]:
        unknown = set(bench_options["shapes"]) - {s.name for s in shapes}
        assert not unknown, f"unknown shapes {sorted(unknown)}; known: {[s.name for s in shapes]}"
        shapes = [s for s in shapes if s.name in bench_options["shapes"]]
    repeats = bench_options["repeats"] or (20 if device.type == "cuda" else 5)
    timer = Timer(device, repeats, warmup=3 if device.type == "cuda" else 1)
    dtype = torch.bfloat16
    compiled_rope = torch.compile(reference_rope)
    compiled_qk_norm_rope = torch.compile(reference_qk_norm_rope)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"

    rows: list[dict[str, object]] = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        layout = [shape.tokens] if shape.sequences > 1 else [1, shape.tokens]  # packed [N, H, D] or 4D
        q = torch.randn(*layout, shape.heads, shape.head_dim, generator=g).to(device, dtype)
        k = torch.randn(*layout, shape.heads, shape.head_dim, generator=g).to(device, dtype)
        positions = shape_positions(shape).to(device).view(*layout, 4)
        q_weight = (1 + 0.1 * torch.randn(shape.head_dim, generator=g)).to(device, dtype)
        k_weight = (1 + 0.1 * torch.randn(shape.head_dim, generator=g)).to(device, dtype)

        qk_bytes = (q.numel() + k.numel()) * q.element_size()
        side_bytes = positions.numel() * positions.element_size()
        # The bandwidth ceiling every %copy divides by: cheap, so the best of 10× as many runs.
        copy_timer = Timer(device, 10 * repeats, timer.warmup, best=True)
        copy_s = copy_seconds(copy_timer, q.numel() + k.numel(), device, dtype)  # reads and writes qk_bytes
        copy_gbs = 2 * qk_bytes / copy_s / 1e9
        rows.append(row(shape, "copy", "copy", "fwd", copy_s, 2 * qk_bytes, copy_gbs, device_name))

        weights = 2 * shape.head_dim * q_weight.element_size()
        Variants = dict[str, Callable[..., tuple[Tensor, Tensor]]]
        ops: dict[str, tuple[list[Tensor], dict[str, int], Variants]] = {
            "rope": (
                [q, k],
                {"fwd": 2 * qk_bytes + side_bytes, "bwd": 2 * qk_bytes + side_bytes},
                {"triton": kernel_rope, "eager": reference_rope, "compile": compiled_rope},
            ),
            "qk_norm_rope": (
                [q, k, q_weight, k_weight],
                {"fwd": 2 * qk_bytes + side_bytes + weights, "bwd": 3 * qk_bytes + side_bytes + 2 * weights},
                {
                    "triton": kernel_qk_norm_rope,
                    "triton-separate": separate_qk_norm_rope,
                    "eager": reference_qk_norm_rope,
                    "compile": compiled_qk_norm_rope,
                },
            ),
        }
        for op, (inputs, op_bytes, variants) in ops.items():
            op_bytes["fwd+bwd"] = op_bytes["fwd"] + op_bytes["bwd"]
            seconds = {name: time_directions(timer, fn, inputs, positions) for name, fn in variants.items()}
            for name, by_direction in seconds.items():
                for direction, s in by_direction.items():
                    gbs = op_bytes[direction] / s / 1e9
                    r = row(shape, op, name, direction, s, op_bytes[direction], gbs, device_name)
                    r["%copy"] = round(100 * gbs / copy_gbs, 1)
                    r["x eager"] = round(seconds["eager"][direction] / s, 3)
                    r["x compile"] = round(seconds["compile"][direction] / s, 3)
                    rows.append(r)

    print_table(rows, device_name, bench_options["size"], repeats)
    print_targets(rows)
    write_csv(rows, Path(bench_options["csv_dir"]) / "rope.csv")


def row(
    shape: Shape, op: str, variant: str, direction: str, seconds: float, nbytes: int, gbs: float, device: str
) -> dict[str, object]:
    return {
        "shape": shape.name,
        "tokens": shape.tokens,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "sequences": shape.sequences,
        "op": op,
        "variant": variant,
        "direction": direction,
        "ms": round(seconds * 1e3, 4),
        "MB": round(nbytes / 1e6, 3),
        "GB/s": round(gbs, 3),
        "%copy": "",
        "x eager": "",
        "x compile": "",
        "device": device,
    }


TABLE_COLUMNS = (
    "shape", "op", "variant", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd GB/s", "bwd GB/s",
    "fwd %copy", "bwd %copy", "x eager", "x compile",
)  # fmt: skip


def print_table(rows: list[dict[str, object]], device: str, size: str, repeats: int) -> None:
    """One line per shape, op and variant; speedups are of forward+backward."""
    print(f"\nRoPE benchmark: {device}, size {size}, bf16, median of {repeats}")
    print("| " + " | ".join(TABLE_COLUMNS) + " |")
    print("|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|")
    lines: dict[tuple[object, ...], dict[str, object]] = {}
    for r in rows:
        line = lines.setdefault((r["shape"], r["op"], r["variant"]), {c: "" for c in TABLE_COLUMNS})
        line.update(shape=r["shape"], op=r["op"], variant=r["variant"])
        d = r["direction"]
        line[f"{d} ms"] = r["ms"]
        if d != "fwd+bwd":
            line[f"{d} GB/s"], line[f"{d} %copy"] = r["GB/s"], r["%copy"]
        else:
            line["x eager"], line["x compile"] = r["x eager"], r["x compile"]
    for line in lines.values():
        print("| " + " | ".join(str(line[c]) for c in TABLE_COLUMNS) + " |")


def print_targets(rows: list[dict[str, object]]) -> None:
    """The issue's GPU targets, computed from this run (informative on CPU: interpreter times)."""

    def ms(shape: str, op: str, variant: str, direction: str) -> float | None:
        for r in rows:
            if (r["shape"], r["op"], r["variant"], r["direction"]) == (shape, op, variant, direction):
                return float(r["ms"])  # type: ignore[arg-type]
        return None

    print("\nIssue 4 targets (H100/H200):")
    for r in rows:
        if r["op"] == "rope" and r["variant"] == "triton" and r["direction"] in ("fwd", "bwd"):
            print(f"  {r['shape']} rope {r['direction']}: {r['%copy']}% of copy bandwidth (target >= 85%)")
        if r["op"] == "rope" and r["variant"] == "triton" and r["direction"] == "fwd+bwd":
            print(f"  {r['shape']} rope fwd+bwd: {r['x compile']}x torch.compile (target >= 1.2x)")
    packed, single = ms("packed2000", "rope", "triton", "fwd+bwd"), ms("wan14b", "rope", "triton", "fwd+bwd")
    if packed is not None and single is not None:
        print(f"  packed2000 / wan14b rope fwd+bwd time: {packed / single:.3f} (target <= 1.05)")
    for shape in dict.fromkeys(str(r["shape"]) for r in rows):
        fused, separate = (
            ms(shape, "qk_norm_rope", "triton", "fwd+bwd"),
            ms(shape, "qk_norm_rope", "triton-separate", "fwd+bwd"),
        )
        if fused is not None and separate is not None:
            print(
                f"  {shape} fused QK-norm+RoPE vs separate, fwd+bwd: {separate / fused:.2f}x (target >= 1.5x)"
            )


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}")

"""Training-step benchmark: tokens/s and model FLOPs utilisation (MFU) of one DiT on one device.

    pytest tests/benchmarks/test_train_step_bench.py -m benchmark -s [--bench-size small|full]
        [--bench-shapes 16k,32k] [--bench-repeats 10] [--bench-csv runs/bench]

``full`` (the default on CUDA): ``dit_1b`` in bf16 autocast with fp32 weights and fused AdamW,
packed batches of about 16k and 32k tokens (4-frame 64×64 latent clips with 64 text tokens each).
``small`` (the default on CPU): ``dit_tiny`` in fp32 at 768 and 1,536 tokens (the cases keep the names
``16k``/``32k`` for ``--bench-shapes``) — it checks the
harness, its figures are not a statement about any GPU.

A step is forward, backward and optimiser step, as the Trainer runs it (flow-matching loss).
Model FLOPs count the matmuls a step must do: ``6 ×`` (linear weights each token passes through)
per token, plus ``3 × 4·d·ΣL²`` per block for attention scores and values (``L``: each packed
sequence's length); text projections count on text tokens only. MFU = model FLOPs per second /
the device's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; override with
``IMONTAGE_PEAK_TFLOPS``). Times are medians over the repeats after warm-up steps.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from imontage.config.schema import ModelConfig
from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.dit.model import DiT
from imontage.objectives.flow_matching import FlowMatching

pytestmark = pytest.mark.benchmark

REPO = Path(__file__).resolve().parents[2]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM parts


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    samples: int  # packed clips
    frames: int
    latent_hw: int
    text_tokens: int


FULL = [Case("16k", "dit_1b", 4, 4, 64, 64), Case("32k", "dit_1b", 8, 4, 64, 64)]
SMALL = [Case("16k", "dit_tiny", 4, 2, 32, 64), Case("32k", "dit_tiny", 8, 2, 32, 64)]


def model_config(name: str) -> ModelConfig:
    return OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / f"configs/model/{name}.yaml")
    )


def packed_batch(cfg: ModelConfig, case: Case, device: torch.device):
    g = torch.Generator().manual_seed(0)
    channels, text_dim = int(cfg.in_channels), int(cfg.text_dim)
    samples = []
    for _ in range(case.samples):
        text = (
            Segment("text", data=torch.randn(case.text_tokens, text_dim, generator=g))
            if cfg.text_encoder == "precomputed"
            else Segment("text", text="x" * case.text_tokens)
        )
        clip = torch.randn(channels, case.frames, case.latent_hw, case.latent_hw, generator=g)
        samples.append(Sample([text, Segment("video", "target", clip)]))
    return pack_samples(samples, packing_spec(cfg)).to(device)


def model_flops(model: DiT, batch) -> float:
    """Matmul FLOPs of one training step (module docstring)."""
    tokens = batch.tokens.shape[0]
    text = int(batch.is_text.sum())
    per_token = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            per_token += module.weight.numel() * (text / tokens if name.startswith("text_proj") else 1.0)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    attention = 4.0 * model.hidden_size * float((lengths**2).sum()) * len(model.blocks)
    return 3.0 * (2.0 * per_token * tokens + attention)


def peak_flops(device: torch.device) -> float | None:
    if "IMONTAGE_PEAK_TFLOPS" in os.environ:
        return float(os.environ["IMONTAGE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for part, tflops in PEAK_TFLOPS.items() if part in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, device: torch.device, repeats: int) -> dict:
    """Median step time of ``case`` and the figures derived from it."""
    cfg = model_config(case.model)
    torch.manual_seed(0)
    model = DiT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = packed_batch(cfg, case, device)
    objective, generator = FlowMatching(), torch.Generator().manual_seed(0)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective(model, batch, generator).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels, allocator, optimiser state
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    flops, peak, tokens = model_flops(model, batch), peak_flops(device), batch.tokens.shape[0]
    return {
        "case": case.name, "model": case.model, "tokens": tokens,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
        "tflops": round(flops / seconds / 1e12, 3),
        "mfu": "" if peak is None else round(flops / seconds / peak, 4),
    }  # fmt: skip


def test_train_step(bench_options: dict) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = bench_options["size"] == "full"
    cases = [
        c
        for c in (FULL if full else SMALL)
        if not bench_options["shapes"] or c.name in bench_options["shapes"]
    ]
    repeats = bench_options["repeats"] or (10 if full else 5)
    rows = [time_case(case, device, repeats) for case in cases]
    assert all(row["step_s"] > 0 for row in rows)
    path = Path(bench_options["csv_dir"]) / "train_step.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print()
    for row in rows:
        print("  ".join(f"{key}={value}" for key, value in row.items()))
    print(f"written: {path}")

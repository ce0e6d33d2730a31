"""Training-step benchmark: imontage's Wan against diffusers' ``WanTransformer3DModel``, same weights.

    pytest tests/benchmarks/test_wan_step_bench.py -m benchmark -s [--bench-size small|full]
        [--bench-shapes 16k,32k] [--bench-repeats 10] [--bench-csv runs/bench]

Both models are built from one config, diffusers' with its default random init and imontage's
loaded from diffusers' ``state_dict()`` by name (strict). A step is forward and backward of the same
loss, the mean square of the output over the target (video) rows; no optimiser. Both get the same
single sample (one clip and its text): imontage packed, diffusers as ``[1, C, T, H, W]`` with the
text zero-padded to ``text_len`` as its pipeline does. The two steps alternate over the repeats after
warm-up steps; times are medians, ``ratio`` = imontage / diffusers (below 1: imontage is faster).

``full`` (the default on CUDA): ``wan2.1_t2v_1.3b`` with bf16 weights (random; diffusers keeps the
modules it lists in ``_keep_in_fp32_modules`` in fp32, as its ``from_pretrained`` does), one
512×512 clip of 16 or 32 latent frames: 16,384 or 32,768 video tokens, 64 text tokens padded to 512. The 32k case
runs both models with activation checkpointing (``checkpointing`` column): without it the saved
activations of 30 layers may not fit beside two models and their gradients.
``full`` on CPU: the same Wan-shaped model cut to width 512 (4 heads × 128), 4 blocks, FFN 2048, in
fp32, one thread, at 2,048 and 4,096 video tokens (cases ``2k``, ``4k``; 64 text tokens padded to
512): a size where matrix products dominate the step, so that the ratio compares the two models'
layouts rather than their Python overhead (a 2k step is about 5 s of CPU time; 5 repeats).
``small`` (the default on CPU): ``wan_tiny`` in fp32 at 512 and 1,024 video tokens, single-threaded
(the cases keep the names ``16k``/``32k``) — it checks the harness in seconds, not any speed.
On CPU the table also gives each step's process CPU time (``*_cpu_s``, ``cpu_ratio``, medians of the
same repeats): on a shared machine it leaves out the time the step waited for a core.

Model FLOPs count the matmuls a step must do, ``3 ×`` the forward's: ``2 ×`` each linear weight per
token it sees (video tokens; the text embedder and the cross-attention's k/v on the padded text;
the time embedding once per sample) plus, per block, ``4·d·L²`` for self-attention and
``4·d·L·text_len`` for cross-attention. Recomputation under checkpointing is not counted. MFU as in
``test_train_step_bench.py`` (dense bf16 peak by device name, or ``IMONTAGE_PEAK_TFLOPS``).
Nothing here asserts on time: only that both models give the same output and the figures are finite.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from imontage.config.schema import ModelConfig
from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples, unpatchify_segments
from imontage.models.common.attention import resolve_backend
from imontage.models.wan.model import WanTransformer, build_wan

from .test_train_step_bench import REPO, peak_flops, synchronize

pytestmark = pytest.mark.benchmark


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    frames: int  # latent frames
    latent_hw: int
    text_tokens: int
    checkpointing: bool = False
    overrides: tuple[tuple[str, int], ...] = ()  # model config fields changed from the preset's

    @property
    def label(self) -> str:
        return " ".join([self.model, *(f"{key}={value}" for key, value in self.overrides)])


FULL = [
    Case("16k", "wan2.1_t2v_1.3b", 16, 64, 64),
    Case("32k", "wan2.1_t2v_1.3b", 32, 64, 64, checkpointing=True),
]
# CPU full: Wan 2.1 1.3B's layers (head dim 128, text 4096 -> 512 tokens) at width 512, 4 blocks.
WAN_512 = (("hidden_size", 512), ("num_heads", 4), ("depth", 4), ("mlp_hidden_size", 2048))
CPU_FULL = [
    Case("2k", "wan2.1_t2v_1.3b", 2, 64, 64, overrides=WAN_512),
    Case("4k", "wan2.1_t2v_1.3b", 4, 64, 64, overrides=WAN_512),
]
SMALL = [Case("16k", "wan_tiny", 2, 32, 8), Case("32k", "wan_tiny", 4, 32, 8)]


def model_config(name: str, overrides: tuple[tuple[str, Any], ...] = ()) -> ModelConfig:
    """The preset ``name`` with ``overrides`` (dotted keys: ``("wan.boundary_ratio", 0.875)``)."""
    return OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        OmegaConf.load(REPO / f"configs/model/{name}.yaml"),
        OmegaConf.from_dotlist([f"{key}={value}" for key, value in overrides]),
    )


def diffusers_model(cfg: ModelConfig) -> Any:
    """diffusers' ``WanTransformer3DModel`` of the same shape as ``cfg``'s imontage model."""
    from imontage.checkpoint.diffusers import build_diffusers_model

    return build_diffusers_model(cfg)


@dataclass
class Inputs:
    """One sample for both models: imontage's packed batch and diffusers' keyword arguments."""

    batch: Any  # PackedBatch
    diffusers: dict[str, torch.Tensor]
    video_tokens: int
    text_tokens: int  # what the cross-attention attends to: text_len (padded) or the text itself


def make_inputs(cfg: ModelConfig, case: Case, device: torch.device, dtype: torch.dtype) -> Inputs:
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(cfg.in_channels, case.frames, case.latent_hw, case.latent_hw, generator=g)
    text = torch.randn(case.text_tokens, cfg.text_dim, generator=g)
    t = 0.5  # one timestep for the sample, as Wan 2.1 trains
    batch = pack_samples(
        [Sample([Segment("text", data=text), Segment("video", "target", clip)])],
        packing_spec(cfg),
    )
    batch = batch.replace(timesteps=torch.where(batch.is_text, 0.0, t)).to(device)
    text_len = int(cfg.wan.text_len) or case.text_tokens
    padded = torch.cat([text, text.new_zeros(text_len - case.text_tokens, cfg.text_dim)])
    reference = {
        "hidden_states": clip[None].to(device, dtype),  # [1, C, T, H, W]
        "timestep": torch.tensor([1000.0 * t], device=device),
        "encoder_hidden_states": padded[None].to(device, dtype),  # [1, text_len, E]
    }
    pt, ph, pw = cfg.patch_size
    video = case.frames // pt * (case.latent_hw // ph) * (case.latent_hw // pw)
    return Inputs(batch, reference, video, text_len)


def model_flops(model: WanTransformer, inputs: Inputs) -> float:
    """Matmul FLOPs of one forward and backward (module docstring); one sample."""
    video, text = inputs.video_tokens, inputs.text_tokens
    text_weights = ("condition_embedder.text_embedder.", ".attn2.to_k.", ".attn2.to_v.")

    def tokens_through(name: str) -> int:
        key = f".{name}."
        if any(part in key for part in text_weights):
            return text
        return 1 if ".condition_embedder.time_" in key else video  # the time embedding: per sample

    per_step = 0.0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            per_step += 2.0 * module.weight.numel() * tokens_through(name)
    width = model.patch_embedding.weight.shape[0]
    per_step += len(model.blocks) * 4.0 * width * (video**2 + video * text)
    return 3.0 * per_step


def steps(model: WanTransformer, reference: Any, inputs: Inputs) -> dict[str, Any]:
    """One training step per model: each returns its output ``[C, T, H, W]`` (detached) and loss."""
    batch, target = inputs.batch, ~inputs.batch.is_text

    def imontage_step() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(batch)  # [N, C·pt·ph·pw]; text rows are zero
        loss = out[target].float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return unpatchify_segments(out.detach(), batch, model.patch_size)[0][1], loss.detach()

    def diffusers_step() -> tuple[torch.Tensor, torch.Tensor]:
        out = reference(**inputs.diffusers, return_dict=False)[0]  # [1, C, T, H, W]
        loss = out.float().square().mean()
        loss.backward()
        reference.zero_grad(set_to_none=True)
        return out.detach()[0], loss.detach()

    return {"imontage": imontage_step, "diffusers": diffusers_step}


def to_bf16(reference: Any) -> Any:
    """diffusers' model in bf16 as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads it: the modules
    it names in ``_keep_in_fp32_modules`` (time embedder, norms, modulation tables) stay fp32.

    imontage's model is cast whole (it runs norms and modulation in fp32 itself); it cannot take this
    mixed layout: its ``time_proj`` would get the fp32 time embedding.
    """
    keep = set(reference._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if not keep.intersection(name.split(".")):
                parameter.data = parameter.data.to(torch.bfloat16)
    return reference


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@dataclass
class Timed:
    """What :func:`alternate_steps` measured, per step name."""

    results: dict[str, tuple[torch.Tensor, torch.Tensor]]  # the first run's (output, loss)
    seconds: dict[str, float]  # median wall time of the timed repeats
    cpu_seconds: dict[str, float]  # median process CPU time (one thread on CPU)
    peak_gib: dict[
        str, Any
    ]  # GiB allocated at the first run's peak on CUDA (both models resident); "" on CPU


def alternate_steps(
    step: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> Timed:
    """Run each of ``step``'s functions ``warmup + repeats`` times, alternating (drift in the machine's
    speed hits them alike), and take the medians of the timed repeats."""
    times: dict[str, list[float]] = {name: [] for name in step}
    cpu_times: dict[str, list[float]] = {name: [] for name in step}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    peak_memory: dict[str, Any] = dict.fromkeys(step, "")
    for index in range(warmup + repeats):
        for name, fn in step.items():
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            result = fn()
            synchronize(device)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            if index == 0:
                results[name] = result
                if device.type == "cuda":
                    peak_memory[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
            elif index >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
    return Timed(
        results,
        {name: statistics.median(values) for name, values in times.items()},
        {name: statistics.median(values) for name, values in cpu_times.items()},
        peak_memory,
    )


def model_pair(
    cfg: Any, case: Any, device: torch.device, dtype: torch.dtype, reference_of: Callable, model_of: Callable
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers' model, imontage's) of ``cfg`` with the same weights, in ``dtype`` (bf16: diffusers'
    way, :func:`to_bf16`) on ``device``, in training mode, both checkpointing when the case asks."""
    torch.manual_seed(0)
    reference = reference_of(cfg)
    model = model_of(cfg)
    model.load_state_dict(reference.state_dict(), strict=True)
    reference, model = to_bf16(reference) if dtype == torch.bfloat16 else reference, model.to(dtype)
    reference, model = reference.to(device).train(), model.to(device).train()
    if case.checkpointing:
        model.gradient_checkpointing = True
        reference.enable_gradient_checkpointing()
    return reference, model


def time_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int = 2) -> dict:
    cfg = model_config(case.model, case.overrides)
    reference, model = model_pair(cfg, case, device, dtype, diffusers_model, build_wan)
    inputs = make_inputs(cfg, case, device, dtype)
    timed = alternate_steps(steps(model, reference, inputs), device, repeats, warmup)
    results, seconds, cpu_seconds, peak_memory = (
        timed.results,
        timed.seconds,
        timed.cpu_seconds,
        timed.peak_gib,
    )
    (ours, our_loss), (theirs, their_loss) = results["imontage"], results["diffusers"]
    on_cpu = device.type == "cpu"
    flops, peak = model_flops(model, inputs), peak_flops(device)
    probe = torch.empty(0, device=device, dtype=dtype)
    return {
        "case": case.name, "model": case.label, "video_tokens": inputs.video_tokens,
        "text_tokens": inputs.text_tokens,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "checkpointing": case.checkpointing,
        "attention": resolve_backend(str(cfg.attention_backend), probe),
        "imontage_s": round(seconds["imontage"], 4), "diffusers_s": round(seconds["diffusers"], 4),
        "ratio": round(seconds["imontage"] / seconds["diffusers"], 3), "repeats": repeats,
        "threads": torch.get_num_threads() if on_cpu else "",
        "imontage_cpu_s": round(cpu_seconds["imontage"], 4) if on_cpu else "",
        "diffusers_cpu_s": round(cpu_seconds["diffusers"], 4) if on_cpu else "",
        "cpu_ratio": round(cpu_seconds["imontage"] / cpu_seconds["diffusers"], 3) if on_cpu else "",
        "imontage_tok_s": round(inputs.video_tokens / seconds["imontage"], 1),
        "diffusers_tok_s": round(inputs.video_tokens / seconds["diffusers"], 1),
        "tflop_step": float(f"{flops / 1e12:.4g}"),
        "imontage_mfu": "" if peak is None else round(flops / seconds["imontage"] / peak, 4),
        "diffusers_mfu": "" if peak is None else round(flops / seconds["diffusers"] / peak, 4),
        "imontage_gib": peak_memory["imontage"], "diffusers_gib": peak_memory["diffusers"],
        "out_rel_diff": float(f"{relative_difference(ours, theirs):.3g}"),
        "loss_rel_diff": float(f"{abs(float(our_loss) / float(their_loss) - 1):.3g}"),
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in rows[0]}
    print()
    print("  ".join(key.rjust(width) for key, width in widths.items()))
    for row in rows:
        print("  ".join(str(row[key]).rjust(width) for key, width in widths.items()))


def bench_device(request: pytest.FixtureRequest) -> torch.device:
    """CUDA when there is one; on the CPU one intra-op thread for the test (on a small shared VM,
    waking a second one costs milliseconds at random)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    return device


def select_cases(bench_options: dict, device: torch.device, full: list, cpu_full: list, small: list) -> list:
    """The cases of the asked size (``full`` on CUDA, ``cpu_full`` on the CPU, else ``small``),
    only those named by ``--bench-shapes`` when it is given."""
    chosen = (full if device.type == "cuda" else cpu_full) if bench_options["size"] == "full" else small
    return [c for c in chosen if not bench_options["shapes"] or c.name in bench_options["shapes"]]


def run_cases(cases: list, device: torch.device, repeats: int, time_one: Callable[..., dict]) -> list[dict]:
    """One row per case, timed in turn; on CUDA each case's memory is given back before the next."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for case in cases:
        rows.append(time_one(case, device, dtype, repeats))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the case's models are gone: give the next its memory
    return rows


def report_rows(rows: list[dict], csv_path: Path, device: torch.device, figures: tuple[str, ...]) -> None:
    """Write ``rows`` to ``csv_path``, print them, and check that both sides computed the same thing
    (fp32 to rounding, bf16 loosely) and every figure is a positive number."""
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print(f"written: {csv_path}")
    tolerance = 0.05 if device.type == "cuda" else 1e-4
    for row in rows:
        assert row["out_rel_diff"] < tolerance and row["loss_rel_diff"] < tolerance, row
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in figures), row


def test_wan_step_against_diffusers(bench_options: dict, request: pytest.FixtureRequest) -> None:
    device = bench_device(request)
    full = bench_options["size"] == "full"
    cases = select_cases(bench_options, device, FULL, CPU_FULL, SMALL)
    repeats = bench_options["repeats"] or (10 if full and device.type == "cuda" else 5)
    rows = run_cases(cases, device, repeats, time_case)
    report_rows(
        rows,
        Path(bench_options["csv_dir"]) / "wan_step.csv",
        device,
        ("imontage_s", "diffusers_s", "ratio", "tflop_step"),
    )

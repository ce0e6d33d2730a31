#!/usr/bin/env python
"""Per GPU, for one training step of a parallel model: its collectives, per layer, and its memory.

    python tools/plan.py --model dit_1b --tokens 16384 --parallel tp2_sp
    python tools/plan.py --model wan2.1_t2v_14b --tokens 32768 --gpus 8 --bf16 \\
        --parallel tp2_sp parallel.activation_checkpointing=true
    python tools/plan.py --model wan2.1_t2v_14b --tokens 32768 --gpus 8 --bf16 --compare dp-ac tp2-sp-ac cp4-ac
    python tools/plan.py --model wan2.1_t2v_14b --tokens 32768 --gpus 8 --bf16 --no-ema model.lora.rank=64 \\
        'model.lora.targets=[blocks.*.attn1.to_*,blocks.*.attn2.to_*,blocks.*.ffn.net.*]' --compare dp-ac cp2-ac
    python tools/plan.py --model hunyuan_video_i2v_13b --tokens 32768 --text-tokens 256 --gpus 8 --bf16 \\
        --parallel ulysses2 parallel.activation_checkpointing=true --memory-only

``--model`` and ``--parallel`` name files of configs/model and configs/parallel (or give paths);
``model.KEY=VALUE`` and ``parallel.KEY=VALUE`` override them. ``--tokens`` counts the visual (patch)
tokens of one micro-batch, ``--text-tokens`` each sample's text tokens (the DiT packs them into its
sequence; Wan reads them as its cross-attention context, padded to ``model.wan.text_len``;
HunyuanVideo runs them as its text stream; ``--text-tokens-2``: HunyuanVideo 1.5's ByT5 glyph
text, beside them in its text stream). ``--compare`` prints one line per layout: ``dp`` (ZeRO-3
only), or ``tpN``, ``cpN``, ``sp``, ``ac`` / ``noac`` joined by ``-`` (``tp4-sp-cp2-ac``) over the
``--parallel`` file (put overrides before ``--compare``). LoRA: ``model.lora.rank=64
'model.lora.targets=[blocks.*.attn1.to_*,blocks.*.attn2.to_*,blocks.*.ffn.net.*]'`` (the
estimate models adapters on every attention and FFN linear of the blocks, DiT, Wan and
HunyuanVideo 1.5, without TP, and refuses other cases). A model of experts (Wan 2.2 A14B): with
``model.expert`` the one expert a run trains; without it both experts in one run, one ZeRO-3 engine
that partitions both experts' weights, gradients and optimiser state while each step gathers,
exchanges and keeps the activations of one (LoRA targets then name both: ``transformer*.blocks.*...``).
The memory estimate and what it leaves out: ``imontage.cost.memory.estimate_memory``; ZeRO-3's own
collectives are not in the per-layer table (docs/parallel.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imontage.config.schema import ModelConfig, ParallelConfig
from imontage.cost import (
    PRECISIONS,
    Layout,
    MemoryEstimate,
    MicroBatch,
    ModelShape,
    PlanError,
    communication_plan,
    estimate_memory,
    format_memory,
    format_plan,
    model_shape,
    zero3_traffic,
)
from imontage.models import build_model
from imontage.models.lora import adapted_modules

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_group(group: str, name: str, schema: type, overrides: list[str]) -> Any:
    path = Path(name) if name.endswith(".yaml") else CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"plan.py: {path}: no such {group} config")
    try:
        return OmegaConf.merge(
            OmegaConf.structured(schema), OmegaConf.load(path), OmegaConf.from_dotlist(overrides)
        )
    except OmegaConfBaseException as error:
        raise SystemExit(f"plan.py: {path} with {overrides}: {error}") from None


def parse_layout(spec: str, base: Layout) -> Layout:
    """``dp`` or ``tp2-sp-cp4-ac`` (parts in any order) over ``base``."""
    sizes = {"tp": 1, "cp": 1}
    sequence_parallel, checkpointing = False, base.activation_checkpointing
    for part in spec.split("-"):
        if match := re.fullmatch(r"(tp|cp)(\d+)", part):
            sizes[match[1]] = int(match[2])
        elif part in ("sp", "ac", "noac"):
            sequence_parallel = sequence_parallel or part == "sp"
            checkpointing = {"ac": True, "noac": False}.get(part, checkpointing)
        elif part != "dp":
            raise SystemExit(f"plan.py: --compare {spec!r}: '{part}' is not tpN, cpN, sp, ac, noac or dp")
    return replace(
        base,
        tensor=sizes["tp"],
        context=sizes["cp"],
        sequence_parallel=sequence_parallel,
        activation_checkpointing=checkpointing,
    )


def memory(
    module: Any, shape: ModelShape, batch: MicroBatch, layout: Layout, args: argparse.Namespace
) -> MemoryEstimate:
    precision = PRECISIONS["bf16" if args.bf16 else "fp32"]
    return estimate_memory(module, shape, batch, layout, precision, ema=not args.no_ema)


def compare(module: Any, shape: ModelShape, batch: MicroBatch, base: Layout, args: argparse.Namespace) -> str:
    element_bytes = 2 if args.bf16 else 4
    header = (
        f"{'layout':<14} {'DP':>3} {'CP':>3} {'TP':>3} {'ZeRO':>5} {'states GiB':>11} {'activ. GiB':>11} "
        f"{'total GiB':>10} {'TP/CP wire GiB':>15} {'ZeRO wire GiB':>14}"
    )
    lines = [header, "-" * len(header)]
    for spec in args.compare:
        try:
            layout = parse_layout(spec, base)
            estimate = memory(module, shape, batch, layout, args)
        except (PlanError, ValueError) as error:
            raise SystemExit(f"plan.py: --compare {spec}: {error}") from None
        try:
            wire = f"{sum(c.wire_bytes for c in communication_plan(shape, batch, layout, element_bytes)) / 2**30:15.2f}"
        except PlanError:
            wire = f"{'n/a':>15}"
        zero = sum(zero3_traffic(estimate.census, layout, estimate.precision).values())
        activation = estimate.activations.peak
        lines.append(
            f"{spec:<14} {layout.data:>3} {layout.context:>3} {layout.tensor:>3} {layout.zero:>5} "
            f"{(estimate.total - activation) / 2**30:>11.2f} {activation / 2**30:>11.2f} "
            f"{estimate.total / 2**30:>10.2f} {wire} {zero / 2**30:>14.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="dit_1b", help="configs/model name or YAML path")
    parser.add_argument("--parallel", default="tp2", help="configs/parallel name or YAML path")
    parser.add_argument("--tokens", type=int, required=True, help="visual tokens of one micro-batch")
    parser.add_argument(
        "--text-tokens", type=int, help="text tokens of each sample (default: model.max_text_len)"
    )
    parser.add_argument(
        "--text-tokens-2",
        type=int,
        default=0,
        help="text tokens of each sample from a second text encoder (HunyuanVideo 1.5: ByT5 glyph text)",
    )
    parser.add_argument("--samples", type=int, default=1, help="samples packed in the micro-batch")
    parser.add_argument(
        "--image-tokens",
        type=int,
        help="I2V: image-encoder tokens of each sample (default: the family's, Wan 257, HunyuanVideo 1.5 729)",
    )
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the job (default: one TP × CP group)")
    parser.add_argument("--bf16", action="store_true", help="train.precision=bf16 (default: fp32)")
    parser.add_argument("--no-ema", action="store_true", help="train.ema_decay=0: no fp32 EMA")
    parser.add_argument("--memory-only", action="store_true", help="the memory estimate alone")
    parser.add_argument("--compare", nargs="+", metavar="LAYOUT", help="one line per layout (see above)")
    parser.add_argument("overrides", nargs="*", help="model.KEY=VALUE, parallel.KEY=VALUE")
    args = parser.parse_args(argv)
    groups: dict[str, list[str]] = {"model": [], "parallel": []}
    for item in args.overrides:
        group, _, key = item.partition(".")
        if group not in groups or "=" not in key:
            raise SystemExit(f"plan.py: override {item!r}: expected model.KEY=VALUE or parallel.KEY=VALUE")
        groups[group].append(key)
    cfg = load_group("model", args.model, ModelConfig, groups["model"])
    parallel = load_group("parallel", args.parallel, ParallelConfig, groups["parallel"])
    try:
        shape = model_shape(cfg)
        layout = Layout.from_config(parallel, args.gpus)
    except PlanError as error:
        raise SystemExit(f"plan.py: {args.model}: {error}") from None
    text = cfg.max_text_len if args.text_tokens is None else args.text_tokens
    per_sample = shape.image_tokens if args.image_tokens is None else args.image_tokens
    image = per_sample * args.samples if shape.image_dim else 0
    batch = MicroBatch(
        args.tokens,
        (text + args.text_tokens_2) * args.samples,
        args.samples,
        image,
        args.text_tokens_2 * args.samples,
    )
    try:
        module = build_model(cfg, device="meta")
    except ValueError as error:  # a model it cannot build as asked (an expert it lacks, bad targets)
        raise SystemExit(f"plan.py: {args.model}: {error}") from None
    print(
        f"model {args.model} ({shape.family}): depth {shape.depth}, hidden {shape.hidden_size}, {shape.num_heads} heads; "
        f"{batch.tokens} visual + {batch.text_tokens} text"
        + (f" ({batch.text_tokens_2} of the second encoder)" if batch.text_tokens_2 else "")
        + (f" + {batch.image_tokens} image" if batch.image_tokens else "")
        + f" tokens in {batch.samples} sample(s); "
        f"{'bf16' if args.bf16 else 'fp32'}"
        + (
            f"; LoRA rank {shape.lora_rank} on {sum(1 for _ in adapted_modules(module))} linears, base frozen"
            if shape.lora_rank
            else ""
        )
    )
    if args.compare:
        print(compare(module, shape, batch, layout, args))
        return 0
    print(f"layout {args.parallel}: {layout.describe()}")
    if not args.memory_only:
        try:
            plan = communication_plan(shape, batch, layout, element_bytes=2 if args.bf16 else 4)
        except PlanError as error:
            raise SystemExit(f"plan.py: {error} (--memory-only prints the memory estimate alone)") from None
        print(format_plan(plan) if plan else "no collectives: one rank holds the whole model and sequence")
    if parallel.engine != "deepspeed" or parallel.zero_stage != 3:
        print(
            f"memory: estimated for engine deepspeed, zero_stage 3 (this layout: {parallel.engine}, {parallel.zero_stage})"
        )
        return 0
    try:
        estimate = memory(module, shape, batch, layout, args)
    except (PlanError, ValueError) as error:
        raise SystemExit(f"plan.py: memory: {error}") from None
    print(
        f"memory per GPU (start-up, not in the total: the whole fp32 model, {estimate.census.model * 4 / 2**30:.1f} GiB)"
    )
    print(format_memory(estimate))
    traffic = zero3_traffic(estimate.census, layout, estimate.precision)
    print(
        "ZeRO-3 collectives per micro-batch, MiB/rank wire: "
        + ", ".join(f"{op} {value / 2**20:.1f}" for op, value in traffic.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

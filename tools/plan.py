#!/usr/bin/env python
"""Print the collectives of one training step of a parallel DiT: per layer, bytes and calls.

    python tools/plan.py --model dit_1b --tokens 16384 --parallel tp2_sp
    python tools/plan.py --model dit_14b --tokens 65536 --parallel dit_14b_64gpu --bf16

``--model`` and ``--parallel`` name files of configs/model and configs/parallel (or give paths).
ZeRO-3's parameter gathers and gradient reduce-scatters are not included (see docs/parallel.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from imontage.config.schema import ModelConfig, ParallelConfig
from imontage.parallel.plan import ModelShape, communication_plan, format_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_group(group: str, name: str, schema: type) -> Any:
    path = Path(name) if name.endswith(".yaml") else CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"plan.py: {path}: no such {group} config")
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="dit_1b", help="configs/model name or YAML path")
    parser.add_argument("--parallel", default="tp2", help="configs/parallel name or YAML path")
    parser.add_argument("--tokens", type=int, required=True, help="tokens of one packed micro-batch")
    parser.add_argument("--bf16", action="store_true", help="2-byte activations (default: fp32)")
    args = parser.parse_args(argv)
    model = load_group("model", args.model, ModelConfig)
    parallel = load_group("parallel", args.parallel, ParallelConfig)
    plan = communication_plan(
        ModelShape.from_config(model),
        args.tokens,
        parallel.tensor_parallel,
        parallel.context_parallel,
        parallel.sequence_parallel,
        parallel.activation_checkpointing,
        element_bytes=2 if args.bf16 else 4,
    )
    print(
        f"model {args.model}: depth {model.depth}, hidden {model.hidden_size}, {model.num_heads} heads; "
        f"{args.tokens} tokens; tensor_parallel={parallel.tensor_parallel} "
        f"context_parallel={parallel.context_parallel} sequence_parallel={parallel.sequence_parallel} "
        f"activation_checkpointing={parallel.activation_checkpointing}"
    )
    print(format_plan(plan) if plan else "no collectives: one rank holds the whole model and sequence")
    return 0


if __name__ == "__main__":
    sys.exit(main())

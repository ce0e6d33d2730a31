#!/usr/bin/env python
"""Convert, inspect and verify imontage checkpoints.

python tools/convert_checkpoint.py consolidate RUN_DIR/checkpoints/step_000800 model.safetensors [--weights live] [--dtype bf16]
python tools/convert_checkpoint.py reshard RUN_DIR/checkpoints/step_000800 NEW_RUN_DIR/checkpoints [--tensor-parallel 1 --data-parallel 2]
python tools/convert_checkpoint.py export model.safetensors out_folder [--max-shard-size 5GB]
python tools/convert_checkpoint.py import out_folder model.safetensors
python tools/convert_checkpoint.py inspect PATH [--recipe configs/recipes/x.yaml] [--tensors]
python tools/convert_checkpoint.py verify RUN_DIR/checkpoints/step_000800
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from imontage.checkpoint import convert
from imontage.config import RecipeError, load_recipe
from imontage.train import checkpoint as ckpt

UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def size_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 500MB or 5GB")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def run_inspect(args: argparse.Namespace) -> None:
    info = convert.inspect(args.path)
    print(f"{args.path}: {info['kind']}, step {info['step']}, {info['parameters']:,} parameters in "
          f"{len(info['tensors'])} tensors")  # fmt: skip
    if info.get("layout"):
        print("layout: " + " ".join(f"{key}={value}" for key, value in info["layout"].items()))
    if args.tensors:
        for name, shape, dtype in info["tensors"]:
            print(f"  {name:<60} {dtype:<5} {list(shape)}")
    if args.recipe:
        recipe = OmegaConf.to_container(load_recipe(args.recipe).model, resolve=True)
        diff = convert.config_diff(info["config"], recipe)  # type: ignore[arg-type]
        print(f"model config vs {args.recipe}: " + ("identical" if not diff else f"{len(diff)} differences"))
        for line in diff:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert, inspect and verify imontage checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "consolidate",
        help="training checkpoint (single-device or DeepSpeed ZeRO-3, any layout) -> one safetensors file",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--weights", choices=("ema", "live"), default="ema")
    p.add_argument("--dtype", choices=tuple(convert.DTYPES), default=None, help="cast floating tensors")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every input file")
    p = commands.add_parser(
        "reshard",
        help="DeepSpeed checkpoint -> layout-free training checkpoint (weights, AdamW state, EMA, RNG, "
        "loader) that any layout with the same data-parallel size resumes from",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out_root", type=Path, help="the new run's checkpoints folder (RUN_DIR/checkpoints)")
    p.add_argument("--tensor-parallel", type=int, default=None, help="target layout, checked")
    p.add_argument("--context-parallel", type=int, default=None, help="target layout, checked")
    p.add_argument("--data-parallel", type=int, default=None, help="target layout, checked")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every input file")
    p = commands.add_parser("export", help="consolidated file -> diffusers-style folder")
    p.add_argument("consolidated", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--max-shard-size", type=size_bytes, default=5 * 2**30)
    p = commands.add_parser("import", help="diffusers-style folder -> consolidated file")
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p = commands.add_parser("inspect", help="tensors, parameter count, step, config diff")
    p.add_argument("path", type=Path)
    p.add_argument("--recipe", type=Path, help="print the model config's differences from this recipe's")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p = commands.add_parser("verify", help="check a training checkpoint against its sha256 manifest")
    p.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "consolidate":
            out = convert.consolidate(args.checkpoint, args.out, args.weights, args.dtype, not args.no_verify)
            print(f"wrote {out}")
        elif args.command == "reshard":
            out = convert.reshard(
                args.checkpoint, args.out_root, args.tensor_parallel, args.context_parallel,
                args.data_parallel, not args.no_verify,
            )  # fmt: skip
            print(f"wrote {out}")
        elif args.command == "export":
            print(f"wrote {convert.export_diffusers(args.consolidated, args.out, args.max_shard_size)}")
        elif args.command == "import":
            print(f"wrote {convert.import_diffusers(args.folder, args.out)}")
        elif args.command == "inspect":
            run_inspect(args)
        else:
            print(f"{args.checkpoint}: {convert.verify(args.checkpoint)}")
    except (convert.ConversionError, ckpt.CheckpointError, RecipeError, OSError) as error:
        print(f"convert_checkpoint.py {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

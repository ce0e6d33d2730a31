#!/usr/bin/env python
"""Convert, inspect and verify imontage checkpoints.

python tools/convert_checkpoint.py consolidate RUN_DIR/checkpoints/step_000800 model.safetensors [--weights live] [--dtype bf16]
python tools/convert_checkpoint.py reshard RUN_DIR/checkpoints/step_000800 NEW_RUN_DIR/checkpoints [--tensor-parallel 1 --data-parallel 2]
python tools/convert_checkpoint.py export model.safetensors out_folder [--max-shard-size 5GB]
python tools/convert_checkpoint.py import out_folder model.safetensors
python tools/convert_checkpoint.py import-diffusers Wan2.1-T2V-1.3B-Diffusers/transformer --out wan.safetensors [--config-out configs/model/wan_1_3b.yaml]
python tools/convert_checkpoint.py export-diffusers RUN_DIR/checkpoints/step_000800 [--config configs/recipes/x.yaml] --out exported/transformer [--max-shard-size 5GB]
python tools/convert_checkpoint.py import-pipeline Wan2.2-T2V-A14B-Diffusers --out imported/ [--config-out configs/model/a14b.yaml]
python tools/convert_checkpoint.py export-pipeline transformer=high.safetensors transformer_2=RUN_DIR/checkpoints/step_000800 --config configs/model/a14b.yaml --out exported/ [--components-from Wan2.2-T2V-A14B-Diffusers]
python tools/convert_checkpoint.py export-pipeline RUN_DIR/checkpoints/step_000800 --config configs/model/a14b.yaml --out exported/  (a run of both experts)
python tools/convert_checkpoint.py export-lora RUN_DIR/checkpoints/step_000800 --out pytorch_lora_weights.safetensors
python tools/convert_checkpoint.py inspect PATH [--recipe configs/recipes/x.yaml] [--tensors]
python tools/convert_checkpoint.py verify RUN_DIR/checkpoints/step_000800
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from imontage.checkpoint import convert, pipeline
from imontage.checkpoint import diffusers as diffusers_io
from imontage.config import load_recipe
from imontage.config.model_file import config_diff, model_config
from imontage.untrusted import InputError

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
        diff = config_diff(info["config"], recipe)  # type: ignore[arg-type]
        print(f"model config vs {args.recipe}: " + ("identical" if not diff else f"{len(diff)} differences"))
        for line in diff:
            print(f"  {line}")


def model_config_file(path: Path) -> object:
    """The model config of a recipe (its ``model`` section) or of a ``configs/model`` preset."""
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if isinstance(values, dict) and ("stages" in values or "defaults" in values):
        return load_recipe(path).model
    return model_config({str(k): v for k, v in values.items()} if isinstance(values, dict) else {}, str(path))


def run_import_diffusers(args: argparse.Namespace) -> None:
    out, cfg = diffusers_io.import_folder(args.folder, args.out)
    print(f"wrote {out}")
    preset = diffusers_io.model_config_yaml(cfg, args.folder)
    if args.config_out:
        args.config_out.parent.mkdir(parents=True, exist_ok=True)
        args.config_out.write_text(preset)
        print(f"wrote {args.config_out}")
    else:
        print(preset, end="")


def run_import_pipeline(args: argparse.Namespace) -> None:
    files, cfg = pipeline.import_pipeline(args.folder, args.out)
    for file in files.values():
        print(f"wrote {file}")
    preset = diffusers_io.model_config_yaml(cfg, args.folder)
    if args.config_out:
        args.config_out.parent.mkdir(parents=True, exist_ok=True)
        args.config_out.write_text(preset)
        print(f"wrote {args.config_out}")
    else:
        print(preset, end="")


def component_source(text: str) -> tuple[str, Path]:
    """COMPONENT=PATH, or a bare PATH: a run of every expert (component "", split by expert)."""
    component, sep, path = text.partition("=")
    if not sep:
        return "", Path(text)
    if not component or not path:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not COMPONENT=PATH (e.g. transformer_2=model.safetensors) or PATH"
        )
    return component, Path(path)


def run_export_pipeline(args: argparse.Namespace) -> None:
    out = pipeline.export_pipeline(
        dict(args.sources), args.out, model_config_file(args.config), args.components_from, args.weights,
        args.dtype, args.max_shard_size,
    )  # fmt: skip
    print(f"wrote {out}")


def run_export_diffusers(args: argparse.Namespace) -> None:
    cfg = model_config_file(args.config) if args.config else None
    out = diffusers_io.export_folder(
        args.source, args.out, cfg, args.weights, args.dtype, args.max_shard_size, not args.no_verify,
        base=args.base,
    )  # fmt: skip
    print(f"wrote {out}")


def run_export_lora(args: argparse.Namespace) -> None:
    from imontage.checkpoint.lora import export_lora

    print(f"wrote {export_lora(args.source, args.out, args.weights, not args.no_verify)}")


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
    p = commands.add_parser(
        "import-diffusers",
        help="diffusers folder of a pretrained family (Wan, HunyuanVideo) -> consolidated file + model config",
    )
    p.add_argument("folder", type=Path, help="config.json + diffusion_pytorch_model*.safetensors")
    p.add_argument("--out", type=Path, required=True, help="the consolidated safetensors file to write")
    p.add_argument("--config-out", type=Path, help="write the model config preset here (default: print it)")
    p = commands.add_parser(
        "export-diffusers",
        help="consolidated file or training checkpoint (any layout) -> folder diffusers' from_pretrained loads",
    )
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument("--config", type=Path, help="recipe or model preset (checked against the source's)")
    p.add_argument("--weights", choices=convert.WEIGHT_KINDS, default="ema", help="of a training checkpoint")
    p.add_argument("--dtype", choices=tuple(diffusers_io.DTYPES), default=None,
                   help="cast floating tensors (default: the dtypes of the imported folder)")  # fmt: skip
    p.add_argument("--max-shard-size", type=size_bytes, default=diffusers_io.MAX_SHARD_BYTES)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a training checkpoint")
    p.add_argument("--base", type=Path, default=None,
                   help="a LoRA run's base folder to merge into (default: its model.init_from_diffusers)")  # fmt: skip
    p = commands.add_parser(
        "import-pipeline",
        help="diffusers pipeline folder (model_index.json) -> one consolidated file per transformer + model config",
    )
    p.add_argument("folder", type=Path, help="model_index.json + transformer/ (+ transformer_2/)")
    p.add_argument("--out", type=Path, required=True, help="folder for <component>.safetensors")
    p.add_argument("--config-out", type=Path, help="write the model config preset here (default: print it)")
    p = commands.add_parser(
        "export-pipeline",
        help="one source per transformer (consolidated file or training checkpoint) -> diffusers pipeline folder",
    )
    p.add_argument("sources", type=component_source, nargs="+", metavar="COMPONENT=PATH",
                   help="a source per transformer, or one PATH of a run of every expert")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    p.add_argument("--config", type=Path, required=True, help="recipe or model preset of the pipeline")
    p.add_argument("--components-from", type=Path, default=None,
                   help="a pipeline folder whose other components (VAE, text encoder, ...) are copied")  # fmt: skip
    p.add_argument("--weights", choices=convert.WEIGHT_KINDS, default="ema", help="of a training checkpoint")
    p.add_argument("--dtype", choices=tuple(diffusers_io.DTYPES), default=None,
                   help="cast floating tensors (default: the dtypes of the imported folder)")  # fmt: skip
    p.add_argument("--max-shard-size", type=size_bytes, default=diffusers_io.MAX_SHARD_BYTES)
    p = commands.add_parser(
        "export-lora",
        help="a LoRA run's checkpoint (any layout) or consolidated file -> diffusers' LoRA safetensors file",
    )
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, required=True, help="e.g. pytorch_lora_weights.safetensors")
    p.add_argument("--weights", choices=convert.WEIGHT_KINDS, default="ema", help="of a training checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a training checkpoint")
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
        elif args.command == "import-diffusers":
            run_import_diffusers(args)
        elif args.command == "export-diffusers":
            run_export_diffusers(args)
        elif args.command == "import-pipeline":
            run_import_pipeline(args)
        elif args.command == "export-pipeline":
            run_export_pipeline(args)
        elif args.command == "export-lora":
            run_export_lora(args)
        elif args.command == "inspect":
            run_inspect(args)
        else:
            print(f"{args.checkpoint}: {convert.verify(args.checkpoint)}")
    except (InputError, OSError) as error:  # conversions, checkpoints, recipes and JSON: each names its file
        print(f"convert_checkpoint.py {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

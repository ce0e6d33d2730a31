"""``imontage-sample``: generate from a checkpoint and write a PNG grid.

Conditions come from shards (``--data``, ground truth shown beside the samples) or from a
JSONL prompt file (``--prompts``), one object per line:
``{"text": "...", "conditions": ["a.png", ...], "targets": [[H, W], [T, H, W], ...]}``
with image paths relative to the file. Targets of a prompt file have no ground truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from imontage.checkpoint import convert, zero3
from imontage.data import load_image, preview_samples
from imontage.models.dit import DiT, Sample, Segment, build_dit
from imontage.models.dit.sequence import PackingSpec
from imontage.sample.grid import make_grid, save_png
from imontage.sample.sampler import sample_flow
from imontage.train import checkpoint as ckpt
from imontage.train.trainer import preview_rows, resolve_device

log = logging.getLogger(__name__)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints folder resolved through ``latest``."""
    if (path / ckpt.MANIFEST).exists():
        return path
    for root in (path / "checkpoints", path):
        found = ckpt.find_resume_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(
        f"{path}: no complete checkpoint (a step_* folder with {ckpt.MANIFEST}) found there"
    )


def load_model(checkpoint: Path, use_ema: bool, device: torch.device) -> tuple[DiT, PackingSpec]:
    """The single-device DiT of a checkpoint; a DeepSpeed one is consolidated in memory, tensor by tensor."""
    if zero3.is_zero3_checkpoint(checkpoint):
        reader, model_cfg = convert.open_zero3(checkpoint)
        model = build_dit(model_cfg)
        weights = model.state_dict()
        with torch.no_grad():
            for name, tensor in convert.zero3_tensors(reader, "ema" if use_ema else "fp32"):
                weights[name].copy_(tensor)
        return model.to(device).eval(), PackingSpec.from_model_config(model_cfg)
    tensors, state = ckpt.load_checkpoint(checkpoint)
    model_cfg = OmegaConf.create(state["model_config"])
    model = build_dit(model_cfg)
    weights = tensors["model"]
    if use_ema:
        if "ema" not in tensors:
            raise KeyError(f"{checkpoint}: has no EMA weights; pass --no-ema")
        weights = {**weights, **tensors["ema"]}
    model.load_state_dict(weights)
    return model.to(device).eval(), PackingSpec.from_model_config(model_cfg)


def read_prompts(path: Path, channels: int) -> list[Sample]:
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
            segments = [Segment("text", text=entry["text"])] if entry.get("text") else []
            for image in entry.get("conditions", []):
                segments.append(Segment("image", "condition", load_image(path.parent / image)))
            for size in entry["targets"]:
                frames, height, width = [1, *size] if len(size) == 2 else size
                kind = "image" if frames == 1 else "video"
                segments.append(Segment(kind, "target", torch.zeros(channels, frames, height, width)))
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise ValueError(f"{where}: {error}") from error
        samples.append(Sample(segments, key=where))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imontage-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint folder, or a run directory (uses its latest)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="shards to take conditions (and ground truth) from")
    source.add_argument("--prompts", type=Path, help="JSONL prompt file (see the module docstring)")
    parser.add_argument("--num", type=int, default=8, help="samples to take from --data")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="sample with the live weights")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        device = resolve_device(args.device)
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, spec = load_model(checkpoint, not args.no_ema, device)
        if args.data:
            samples = preview_samples(OmegaConf.create({"shards": args.data}), args.num)
        else:
            samples = read_prompts(args.prompts, spec.in_channels)
    except (OSError, KeyError, ValueError, RuntimeError) as error:  # bad inputs: say which, no traceback
        print(f"imontage-sample: {error}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    outputs = sample_flow(model, samples, spec, args.steps, args.guidance, args.shift, generator, device)
    rows = preview_rows(samples, outputs)
    if args.prompts:  # no ground truth: drop the zero placeholders
        rows = [row[:2] for row in rows]
    save_png(make_grid(rows), args.out)
    print(f"wrote {args.out} ({len(samples)} samples from {checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

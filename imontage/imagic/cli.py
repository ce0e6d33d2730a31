"""``imontage-imagic``: edit one real image towards a target text with Imagic, and write an eta grid.

    imontage-imagic RUN_DIR_OR_CHECKPOINT --image IMG.png --text "..." --out grid.png \\
        [--config configs/recipes/imagic.yaml] [--eta 0,0.5,0.8,1.0] [key=value ...]

``key=value`` overrides address the ``imagic:`` section (``embedding.steps=50``, with or without
the ``imagic.`` prefix). The grid is one row: the input, then one panel per eta.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from imontage.data import load_image
from imontage.data.media import MediaError, load_array
from imontage.imagic.config import COMMAND_LINE, ImagicConfigError, load_imagic_config
from imontage.imagic.edit import (
    ImagicResult,
    check_embedding,
    fit_image,
    imagic_grid,
    run_imagic,
    target_text_embedding,
)
from imontage.models.dit import DiT, PackingSpec
from imontage.sample.cli import load_model, resolve_checkpoint
from imontage.sample.grid import save_png
from imontage.train.trainer import resolve_device

PROG = "imontage-imagic"


def parse_etas(text: str) -> list[float]:
    try:
        etas = [float(value) for value in text.split(",") if value.strip()]
    except ValueError as error:
        raise ImagicConfigError(f"{COMMAND_LINE}: --eta '{text}': {error}") from error
    if not etas:
        raise ImagicConfigError(f"{COMMAND_LINE}: --eta '{text}': needs at least one value")
    return etas


def read_target(model: DiT, spec: PackingSpec, text: str | None, embedding_file: Path | None) -> torch.Tensor:
    """``e_tgt`` ``[L, E]``: the text through the model's byte encoder, or features read from a file.

    A file is a ``.safetensors`` (one tensor) or ``.npy`` array, for models with precomputed text.
    """
    if embedding_file is None:
        assert text is not None
        return target_text_embedding(model, text, spec)
    suffix = embedding_file.suffix.lstrip(".")
    if suffix not in ("safetensors", "npy"):
        raise ValueError(f"{embedding_file}: a text embedding must be a .safetensors or .npy file")
    try:
        return check_embedding(model, torch.from_numpy(load_array(embedding_file.read_bytes(), suffix)), spec)
    except (MediaError, ValueError) as error:
        raise ValueError(f"{embedding_file}: {error}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint folder, or a run directory (uses its latest)"
    )
    parser.add_argument("--image", type=Path, required=True, help="the real image to edit (PNG, JPEG, ...)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--text", help="the target text")
    target.add_argument(
        "--text-embedding",
        type=Path,
        help="target text features [L, E] (.safetensors/.npy), for text_encoder=precomputed",
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG grid to write")
    parser.add_argument(
        "--config", type=Path, help="YAML with an 'imagic:' section (configs/recipes/imagic.yaml)"
    )
    parser.add_argument("--eta", help="comma-separated eta values (overrides the config's imagic.eta)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the imagic section")
    return parser


def read_image(path: Path, spec: PackingSpec, size: list[int]) -> torch.Tensor:
    """The image as ``[C, 1, H, W]``, checked against the model before any optimisation starts."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    image = load_image(path)
    try:
        fit_image(image, spec, size)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return image


def report(result: ImagicResult, out: Path, checkpoint: Path) -> None:
    losses = ", ".join(f"{name} {value:.4f}" for name, value in result.losses.items())
    print(f"reconstruction loss: {losses}")
    # How far each panel moved from the input (model space): where along eta the edit takes hold.
    distances = ", ".join(f"{float((edit - result.image).abs().mean()):.3f}" for edit in result.edits)
    print(f"mean |panel - input| per eta: {distances}")
    etas = ", ".join(f"{eta:g}" for eta in result.etas)
    print(f"wrote {out} (input | eta {etas}; model from {checkpoint})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # bad inputs: say which file or key, no traceback
        etas = [] if args.eta is None else [f"eta=[{','.join(map(str, parse_etas(args.eta)))}]"]
        cfg = load_imagic_config(args.config, [*args.overrides, *etas])
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, spec = load_model(checkpoint, cfg.use_ema, resolve_device(args.device))
        if not isinstance(model, DiT):  # Imagic optimises the DiT's own text path, on pixels
            raise ValueError(
                f"{checkpoint}: Imagic edits with dit-family models; this one is {type(model).__name__}"
            )
        image = read_image(args.image, spec, cfg.image_size)
        target = read_target(model, spec, args.text, args.text_embedding)
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True, warn_only=True)  # same seed, same grid
    result = run_imagic(model, spec, image, cfg, target_embedding=target, progress=not args.no_progress)
    save_png(imagic_grid(result.image, result.edits), args.out)
    report(result, args.out, checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``imontage-imagic``: edit one real image towards a target text with Imagic, and write an eta grid.

    imontage-imagic RUN_DIR_OR_CHECKPOINT --image IMG.png --text "..." --out grid.png \\
        [--config configs/recipes/imagic.yaml] [--eta 0,0.5,0.8,1.0] [key=value ...]
    imontage-imagic RUN_DIR_OR_CHECKPOINT_OR_DIFFUSERS_FOLDER (--image IMG.png --vae VAE | --latent Z) \\
        --text-embedding E.safetensors --out grid.png [--vae VAE] ...          (a latent model: Wan 2.1)

A LoRA run is read with its frozen base, as ``imontage-sample`` reads it (``--base`` gives another),
and edited with its adapters folded into that base: Imagic fine-tunes every weight.

``key=value`` overrides address the ``imagic:`` section (``embedding.steps=50``, with or without
the ``imagic.`` prefix). The grid is one row: the input, then one panel per eta; a latent model's
panels are decoded by ``--vae`` when it is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imontage.checkpoint.components import check_component_folder
from imontage.config.imagic import COMMAND_LINE, ImagicConfigError, load_imagic_config
from imontage.data import load_image
from imontage.data.media import read_array_file
from imontage.imagic.edit import (
    ImagicResult,
    check_embedding,
    fit_image,
    imagic_grid,
    resize_pixels,
    run_imagic,
    target_text_embedding,
    text_width,
)
from imontage.models import build_model, packing_spec
from imontage.models.common import PackingSpec
from imontage.models.lora import merge_lora
from imontage.parallel.state import resolve_device
from imontage.sample.cli import add_base_argument, load_model, resolve_checkpoint
from imontage.sample.grid import save_png

PROG = "imontage-imagic"


def parse_etas(text: str) -> list[float]:
    try:
        etas = [float(value) for value in text.split(",") if value.strip()]
    except ValueError as error:
        raise ImagicConfigError(f"{COMMAND_LINE}: --eta '{text}': {error}") from error
    if not etas:
        raise ImagicConfigError(f"{COMMAND_LINE}: --eta '{text}': needs at least one value")
    return etas


def read_array(path: Path, what: str) -> torch.Tensor:
    """A ``.safetensors`` file of one tensor or a ``.npy`` array (never unpickled), as float32."""
    return torch.from_numpy(read_array_file(path, what))


def read_target(
    model: nn.Module, spec: PackingSpec, text: str | None, embedding_file: Path | None
) -> torch.Tensor:
    """``e_tgt`` ``[L, E]``: the text through the model's byte encoder, or features read from a file.

    A file is a ``.safetensors`` (one tensor) or ``.npy`` array, for models with precomputed text
    (Wan: the UMT5 features of the target text, as tools/encode_shards.py stores a caption's).
    """
    if embedding_file is None:
        assert text is not None
        return target_text_embedding(model, text, spec)
    embedding = read_array(embedding_file, "a text embedding")
    try:
        return check_embedding(model, embedding, spec)
    except ValueError as error:
        raise ValueError(f"{embedding_file}: {error}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="checkpoint folder, a run directory (uses its latest), or a diffusers transformer folder",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="the real image to edit (PNG, JPEG, ...)")
    source.add_argument(
        "--latent",
        type=Path,
        help="the image as a VAE latent [C, 1, H, W] (.safetensors/.npy; a latent shard's member)",
    )
    parser.add_argument(
        "--vae",
        type=Path,
        help="diffusers VAE folder: encodes --image for a latent model and decodes the grid's panels",
    )
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
    add_base_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the imagic section")
    return parser


def load_editable_model(
    path: Path, use_ema: bool, device: torch.device, base: Path | None = None
) -> tuple[nn.Module, PackingSpec, Path]:
    """(model, its packing, where it came from): a training checkpoint (``path`` or a run directory's
    latest), or a diffusers transformer folder (``config.json`` + safetensors) of a pretrained family.

    A LoRA run's model is its base with the adapters folded in (``W + scale · B A``), every weight
    trainable: Imagic fine-tunes the whole model, as it does a full run's. ``base``: the LoRA run's
    frozen base, when not its own (``imontage-sample --base``).
    """
    if not (path / "config.json").is_file():
        checkpoint = resolve_checkpoint(path)
        model, spec = load_model(checkpoint, use_ema, device, base)
        merge_lora(model)
        model.requires_grad_(True)
        return model, spec, checkpoint
    from imontage.checkpoint.diffusers import load_into
    from imontage.config.model_file import read_model_config

    if base is not None:
        raise ValueError(f"--base {base}: {path} is a diffusers folder, not a LoRA run")
    if use_ema:
        raise ValueError(
            f"{path}: a diffusers folder holds one set of weights, no EMA: set imagic.use_ema=false"
        )
    _, _, model_cfg = read_model_config(path)
    model = build_model(model_cfg)
    load_into(model, path)
    return model.to(device).eval(), packing_spec(model_cfg), path


def read_image(path: Path, spec: PackingSpec, size: list[int], vae: Any = None) -> torch.Tensor:
    """The image in model space, ``[C, 1, H, W]``, checked against the model before any optimisation
    starts: its pixels, or with ``vae`` (an imontage.dataprep.encode.VideoVAE) the latent of its pixels
    resized to ``size``, cropped to the VAE's cell and normalised as latent shards are."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    image = load_image(path)  # [3, 1, H, W]
    try:
        if vae is None:
            fit_image(image, spec, size)
            return image
        latent = vae.encode(vae.fit(resize_pixels(image, size))).cpu()  # [C, 1, H / cell, W / cell]
        return fit_image(latent, spec, latent=True)
    except ValueError as error:
        encoded = "" if vae is None else f" (encoded by the VAE, {vae.spatial}-pixel cells)"
        raise ValueError(f"{path}{encoded}: {error}") from error


def read_latent(path: Path, spec: PackingSpec, size: list[int]) -> torch.Tensor:
    """A latent file ``[C, 1, H, W]`` (or ``[C, H, W]``), checked against the model."""
    latent = read_array(path, "a latent")
    if latent.dim() == 3:
        latent = latent.unsqueeze(1)
    try:
        return fit_image(latent, spec, size, latent=True)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def read_input(
    args: argparse.Namespace, spec: PackingSpec, size: list[int], vae: Any
) -> tuple[torch.Tensor, bool]:
    """(the image in model space, whether it is a latent) from ``--image`` or ``--latent``."""
    if args.latent is not None:
        return read_latent(args.latent, spec, size), True
    if vae is None and spec.in_channels != 3:
        raise ValueError(
            f"{args.image}: the model takes {spec.in_channels}-channel latents: give --vae VAE_FOLDER to "
            "encode the image, or the latent itself with --latent"
        )
    return read_image(args.image, spec, size, vae), vae is not None


def grid_panels(result: ImagicResult, vae: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The input and the edits as the grid shows them: decoded to pixels by ``vae`` when given (a
    latent then shows as what the VAE makes of it), else as they are (a latent by its first three
    channels)."""
    if vae is None:
        return result.image, result.edits
    return vae.decode(result.image), [vae.decode(edit) for edit in result.edits]


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
        device = resolve_device(args.device)
        model, spec, checkpoint = load_editable_model(args.checkpoint, cfg.use_ema, device, args.base)
        try:  # Imagic optimises the model's text features [L, E]: the DiT's and Wan's
            text_width(model)
        except ValueError as error:
            raise ValueError(f"{checkpoint}: {error}") from error
        vae = None
        if args.vae is not None:
            from imontage.dataprep.encode import (  # deferred: diffusers is needed only here
                VideoVAE,
                vae_class_name,
            )

            # untrusted: the VAE its config describes must be the weights its folder holds
            check_component_folder(args.vae, vae_class_name(args.vae))
            vae = VideoVAE.load(args.vae, device)
            if vae.channels != spec.in_channels:
                raise ValueError(
                    f"{args.vae}: the VAE's latents have {vae.channels} channels, the model takes {spec.in_channels}"
                )
        image, latent = read_input(args, spec, cfg.image_size, vae)
        target = read_target(model, spec, args.text, args.text_embedding)
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True, warn_only=True)  # same seed, same grid
    result = run_imagic(
        model, spec, image, cfg, target_embedding=target, progress=not args.no_progress, latent=latent
    )
    save_png(imagic_grid(*grid_panels(result, vae)), args.out)
    report(result, args.out, checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

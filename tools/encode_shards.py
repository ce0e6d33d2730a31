"""Encode image/video shards into latent shards: a VAE on every visual segment, a text encoder on the text.

    python tools/encode_shards.py 'data/mine/shard-*.tar' --out data/mine_latents \\
        --vae models/wan/vae --text-encoder models/wan/text_encoder --tokenizer models/wan/tokenizer \\
        [--text-recipe hunyuan_video] [--pooled-text-encoder models/hv/text_encoder_2] [--negative-prompt ""]
        [--text-encoder-2 models/hv15/text_encoder_2 --tokenizer-2 models/hv15/tokenizer_2]
        [--text-recipe hunyuan_video_i2v --text-image-processor models/hv-i2v/image_processor --text-images first]
        [--rank R --world N] [--device cuda] [--dtype bfloat16] [--max-frames 81]
        [--image-encoder models/wan-i2v/image_encoder --image-processor models/wan-i2v/image_processor --i2v-condition]

Each rank (``--rank``/``--world``, default ``RANK``/``WORLD_SIZE``) encodes whole input shards;
finished output shards are skipped on a rerun. Samples it cannot encode (bad data, a latent that
does not divide into ``--patch-size``, NaN or Inf out of a model) are left out, named in the log and
counted in the last line. Train on the result with ``data.text_embeddings=true
model.text_encoder=precomputed``; see docs/data.md, "Latent shards". Anything that stops it (a spec
naming no file, a model folder that is not one, an index file that is not one) is one line on
standard error and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence

import torch

from imontage.checkpoint.components import check_component_folder, check_transformers_folder
from imontage.data.decode import DecodeOptions
from imontage.data.shards import expand_shards
from imontage.dataprep.encode import (
    DEFAULT_PATCH_SIZE,
    IMAGE_ENCODER_CLASS,
    LATENT_DTYPES,
    TEXT_ENCODER_CLASS,
    TEXT_RECIPES,
    VAE_CLASSES,
    Encoders,
    EncodeSettings,
    ShardReport,
    TextRecipe,
    encode_shards,
    vae_class_name,
)
from imontage.dataprep.image_text import IMAGE_TEXT_ENCODER_CLASS, TEXT_IMAGES
from imontage.dataprep.keyframes import KeyframeSelection
from imontage.untrusted import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def patch_size(text: str) -> tuple[int, int, int]:
    """``"1,2,2"`` -> ``(1, 2, 2)``."""
    sizes = text.split(",")
    if len(sizes) != 3 or not all(size.strip().isdigit() and int(size) > 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"'{text}' is not a patch size like 1,2,2 (pt,ph,pw)")
    pt, ph, pw = (int(size) for size in sizes)
    return pt, ph, pw


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", help="input shard spec (globs, brace ranges, comma-separated)")
    parser.add_argument("--out", required=True, help="folder for the latent shards (same file names)")
    parser.add_argument("--vae", required=True, help=f"diffusers VAE folder ({', '.join(VAE_CLASSES)})")
    parser.add_argument(
        "--text-encoder",
        help="transformers text encoder folder (e.g. UMT5EncoderModel); none: no text embeddings",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the text encoder's)")
    parser.add_argument(
        "--text-recipe",
        choices=TEXT_RECIPES,
        default="last_hidden_state",
        help="last_hidden_state (Wan's UMT5); a family's name: its pipeline's (docs/data.md), which also "
        "says how its second text encoder and its image encoder are read",
    )
    parser.add_argument(
        "--text-encoder-2",
        help="the family's second text encoder folder (HunyuanVideo 1.5: ByT5, a T5EncoderModel, on the "
        "prompt's quoted glyph text), read as --text-recipe names it",
    )
    parser.add_argument("--tokenizer-2", help="its tokenizer folder (default: the encoder's)")
    parser.add_argument(
        "--text-image-processor",
        help="under a recipe whose text encoder also sees an image (hunyuan_video_i2v: the LLaVA), its "
        "image processor folder (HunyuanVideo-I2V's image_processor/; default: the text encoder's)",
    )
    parser.add_argument(
        "--text-images",
        choices=TEXT_IMAGES,
        default="first",
        help="which image that encoder sees: the sample's first condition image, or a black one "
        "(docs/data.md says why not the others)",
    )
    parser.add_argument(
        "--max-text-length", type=int, help="tokens kept at most (default: the recipe's, 512 or 256)"
    )
    parser.add_argument(
        "--negative-prompt",
        help="also encode this text (both text encoders) into OUT/negative.safetensors, for "
        "imontage-sample --negative",
    )
    parser.add_argument(
        "--pooled-text-encoder",
        help="a text encoder whose pooled output is stored too (HunyuanVideo: CLIP-L)",
    )
    parser.add_argument("--pooled-tokenizer", help="its tokenizer folder (default: the encoder's)")
    parser.add_argument("--max-pooled-length", type=int, default=77)
    parser.add_argument(
        "--image-encoder",
        help="a vision model folder: the condition image's tokens are stored too (Wan 2.1 I2V's CLIP; "
        "with --text-recipe of a family, as its pipeline reads them: HunyuanVideo 1.5's SigLIP)",
    )
    parser.add_argument("--image-processor", help="its image processor folder (default: the encoder's)")
    parser.add_argument(
        "--i2v-condition",
        action="store_true",
        help="store each target's Wan I2V condition latent: the condition image + zero frames through the VAE",
    )
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the models")
    parser.add_argument("--latent-dtype", choices=sorted(LATENT_DTYPES), default="float32", help="as stored")
    parser.add_argument(
        "--sample-posterior", action="store_true", help="sample the VAE posterior (default: its mode)"
    )
    parser.add_argument(
        "--tiling", action="store_true", help="VAE in spatial tiles (large frames, less memory)"
    )
    parser.add_argument("--seed", type=int, default=0, help="posterior sampling, per sample by (seed, key)")
    parser.add_argument(
        "--max-frames", type=int, default=1 << 30, help="video frames kept at most (the first ones)"
    )
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument(
        "--patch-size",
        type=patch_size,
        default=DEFAULT_PATCH_SIZE,
        help="pt,ph,pw of the model the latents are for; a latent that does not divide into them is "
        "left out (default: 1,2,2, every shipped latent preset's)",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=1 << 24, help="larger images and frames are left out"
    )
    keyframes = parser.add_mutually_exclusive_group()
    keyframes.add_argument(
        "--keyframes",
        choices=["anchors"],
        help="also encode alone, beside each target clip's latent, the frames its condition segments are "
        "anchored at (imontage/dataprep/keyframes.py)",
    )
    keyframes.add_argument(
        "--keyframe-stride",
        type=int,
        default=0,
        help="... or every N-th frame of each target clip from frame 0: candidates for Adaptive Tuning",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def check_model_folders(args: argparse.Namespace) -> None:
    """Every model folder is untrusted: each config is checked against its folder's own weights on
    the meta device before any model is loaded (imontage.checkpoint.components)."""
    check_component_folder(args.vae, vae_class_name(args.vae))
    shows_image = TextRecipe.named(args.text_recipe).image is not None
    for folder, default in (
        (args.text_encoder, IMAGE_TEXT_ENCODER_CLASS if shows_image else TEXT_ENCODER_CLASS),
        (args.pooled_text_encoder, TEXT_ENCODER_CLASS),
        (args.text_encoder_2, TEXT_ENCODER_CLASS),
        (args.image_encoder, IMAGE_ENCODER_CLASS),
    ):
        if folder is not None:
            check_transformers_folder(folder, default)


def encode(args: argparse.Namespace) -> list[ShardReport]:
    """Load the models and encode this rank's shards; their reports."""
    expand_shards(args.shards)  # a spec naming no file fails before the models load
    options = DecodeOptions(
        max_frames=args.max_frames, frame_stride=args.frame_stride, max_pixels=args.max_pixels
    )
    settings = EncodeSettings(
        options, args.latent_dtype, args.seed, args.negative_prompt, patch_size=args.patch_size,
        keyframes=KeyframeSelection(anchors=args.keyframes == "anchors", stride=args.keyframe_stride),
    )  # fmt: skip
    check_model_folders(args)
    encoders = Encoders.load(
        args.vae,
        args.text_encoder,
        args.tokenizer,
        args.pooled_text_encoder,
        args.pooled_tokenizer,
        device=args.device,
        dtype=DTYPES[args.dtype],
        sample_posterior=args.sample_posterior,
        tiling=args.tiling,
        max_text_length=args.max_text_length,
        max_pooled_length=args.max_pooled_length,
        image=args.image_encoder,
        image_processor=args.image_processor,
        i2v_condition=args.i2v_condition,
        text_recipe=args.text_recipe,
        text_2=args.text_encoder_2,
        tokenizer_2=args.tokenizer_2,
        text_image_processor=args.text_image_processor,
        text_images=args.text_images,
    )
    return encode_shards(
        args.shards, args.out, encoders, args.rank, args.world, settings, progress=not args.no_progress
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        reports = encode(args)
    except (InputError, ValueError, OSError) as error:  # InputError: a broken index file, say
        print(f"encode_shards: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    problems: Counter = sum((report.problems for report in reports), Counter())
    done = [r for r in reports if not r.skipped]
    print(
        f"rank {args.rank}/{args.world}: {len(done)} shards encoded ({sum(r.samples for r in done)} samples), "
        f"{len(reports) - len(done)} already done; left out: {dict(problems) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

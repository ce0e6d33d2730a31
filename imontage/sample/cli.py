"""``imontage-sample``: generate from a checkpoint and write a PNG grid.

Conditions come from shards (``--data``, ground truth shown beside the samples) or from a
JSONL prompt file (``--prompts``), one object per line:
``{"text": "...", "conditions": ["a.png", ...], "targets": [[H, W], [T, H, W], ...]}``
with image paths relative to the file. Targets of a prompt file have no ground truth.

A LoRA run's checkpoint (``model.lora``) holds its adapters, not its frozen base: the base is read
as the trainer reads it on resume, from the run's ``model.init_from_diffusers`` (without one, the
run's seeded initialisation, its seed from ``RUN_DIR/config.yaml``), or from ``--base`` (a diffusers
folder, a consolidated file or a full run's checkpoint); the adapters then act as in training.

Classifier-free guidance (``--guidance``, default 3; 1 for HunyuanVideo, whose pipelines run no
true CFG by default) needs an unconditional pass: ``--negative FILE`` runs it on a negative prompt's
precomputed text and pooled text (``tools/encode_shards.py --negative-prompt`` writes
``OUT/negative.safetensors``), as diffusers' HunyuanVideo pipelines run true CFG; ``--negative
text-dropout`` (the default for the other families) drops each sample's text tokens and keeps its
other inputs, as ``flow_matching.text_dropout`` trains. HunyuanVideo takes no default: a pooled text
kept in an unconditional pass must be asked for. A guidance-distilled HunyuanVideo reads
``--embedded-guidance`` (default: the run's ``flow_matching.embedded_guidance``, as it trained).

``--sar FRAMES`` generates one video of FRAMES frames, longer than the model's window, segment by
segment (DreaMontage SAR, :mod:`imontage.sample.sar`): windows of ``--window`` frames, each
conditioned on the last ``--context`` frames of the one before and on the ``--keyframe IDX=PATH``
images (``IDX=A.png,B.png``: a clip from frame IDX on) that fall in it. The grid has one row per
segment: its keyframes, then the frames it generated; the video is written beside it as an MP4
(``--out long.png``: ``long.mp4``), segment by segment. A latent model's SAR takes ``--vae``: the
keyframes are encoded with it as ``tools/encode_shards.py`` encodes an image (IDX a pixel frame, at
latent frame ``ceil(IDX / temporal)``), FRAMES, ``--window`` and ``--context`` count latent frames, and
each segment's new latent frames are decoded as they come (:mod:`imontage.sample.video`); its caption
is precomputed text, ``--text-embedding FILE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from imontage.checkpoint import convert, diffusers, zero3
from imontage.checkpoint import store as ckpt
from imontage.config.model_file import model_config
from imontage.data import load_image, preview_samples
from imontage.dataprep.encode import VideoVAE
from imontage.models import build_model, packing_spec
from imontage.models.common import Sample, Segment
from imontage.models.common.sequence import DEFAULT_EMBEDDED_GUIDANCE, PackingSpec
from imontage.models.lora import base_model_config, frozen_names, lora_enabled
from imontage.models.registry import family
from imontage.objectives.flow_matching import clean_first_frame
from imontage.parallel.state import resolve_device
from imontage.sample.grid import frame_grid, make_grid, preview_rows, save_png, to_frames
from imontage.sample.sampler import Negative, sample_flow
from imontage.sample.sar import Keyframe, iter_sar, plan_video
from imontage.sample.video import (
    DEFAULT_FPS,
    Mp4Writer,
    StreamingDecoder,
    check_vae_folder,
    encode_keyframe,
    keyframe_cell,
    pixel_frames,
    pixel_span,
    read_text_embedding,
    stream_video,
)
from imontage.untrusted import ConversionError

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


def run_setting(checkpoint: Path, key: str) -> Any:
    """``key`` of ``RUN_DIR/config.yaml``, the resolved recipe the run a checkpoint belongs to saved
    beside ``RUN_DIR/checkpoints/step_*``; None when unset. FileNotFoundError when the file is not
    there; ValueError naming the file and key when it does not read."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such file")
    try:
        return OmegaConf.select(OmegaConf.load(config), key)
    except Exception as error:  # yaml.YAMLError, an interpolation that fails: the file and the reason
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{config}: key '{key}': {reason}") from error


def checkpoint_tensors(
    checkpoint: Path, use_ema: bool
) -> tuple[Any, Iterator[tuple[str, torch.Tensor]], Path]:
    """(model config, (name, single-device tensor) of every tensor the checkpoint holds, the file that
    names them). A DeepSpeed checkpoint is consolidated in memory, tensor by tensor (each valid until
    the next is asked for)."""
    if zero3.is_zero3_checkpoint(checkpoint):
        reader, model_cfg = convert.open_zero3(checkpoint)  # its names checked against the config
        return model_cfg, convert.zero3_tensors(reader, "ema" if use_ema else "fp32"), checkpoint
    tensors, state = ckpt.load_checkpoint(checkpoint)
    model_cfg = model_config(state["model_config"], str(checkpoint / ckpt.STATE_FILE))
    weights = tensors["model"]
    if use_ema:
        if "ema" not in tensors:
            raise KeyError(f"{checkpoint}: has no EMA weights; pass --no-ema")
        weights = {**weights, **tensors["ema"]}
    return model_cfg, iter(weights.items()), checkpoint / f"model{ckpt.TENSORS_SUFFIX}"


def frozen_base(checkpoint: Path, model_cfg: Any, base: Path | None) -> Path | int:
    """Where the frozen base of a LoRA run's checkpoint (which holds its trainable tensors only)
    comes from, as the trainer reads it on resume: ``base`` (``--base``), else the run's
    ``model.init_from_diffusers``, else the seed the run built its model with (``RUN_DIR/config.yaml``)."""
    if base is not None:
        return base
    if model_cfg.init_from_diffusers:
        return Path(str(model_cfg.init_from_diffusers))
    try:
        seed = run_setting(checkpoint, "seed")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; {checkpoint} is a LoRA run's checkpoint (adapters only) whose base is the run's "
            "seeded initialisation (no model.init_from_diffusers), and that file holds the seed: give "
            "the base with --base"
        ) from None
    return 0 if seed is None else int(seed)


def load_frozen_base(model: nn.Module, model_cfg: Any, base: Path, checkpoint: Path, origin: str) -> None:
    """Every tensor of a LoRA run's base into ``model``, from anything ``diffusers.model_weights``
    reads (a diffusers folder, a consolidated file, a full run's checkpoint); errors name the file
    and where the base was named (``origin``)."""
    targets = model.state_dict(keep_vars=True)
    try:
        with torch.no_grad():
            for name, tensor in diffusers.model_weights(base, base_model_config(model_cfg)):
                targets[name].copy_(tensor)
    except ConversionError as error:
        raise ConversionError(
            f"{error} (the frozen base of the LoRA run of {checkpoint}, from its {origin}; --base reads another)"
        ) from error


def load_trained(
    model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], where: Path, frozen: set[str]
) -> None:
    """A checkpoint's tensors into ``model``: exactly its tensors less the ``frozen`` base, each of
    the model's shape; errors name the tensor and ``where``."""
    targets = model.state_dict(keep_vars=True)
    expected = {name for name in targets if name not in frozen}
    what = "trainable tensor (model.lora)" if frozen else "tensor"
    seen = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in expected:
                raise ckpt.CheckpointError(
                    f"{where}: tensor '{name}' names no {what} of the model its state.json describes"
                )
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise ckpt.CheckpointError(
                    f"{where}: tensor '{name}' has shape {tuple(tensor.shape)}, the model's is "
                    f"{tuple(targets[name].shape)}"
                )
            targets[name].copy_(tensor)
            seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise ckpt.CheckpointError(
            f"{where}: {what} '{missing[0]}' missing (and {len(missing) - 1} more) for its model"
        )


def load_model_config(
    checkpoint: Path, use_ema: bool, device: torch.device, base: Path | None = None
) -> tuple[nn.Module, Any]:
    """The single-device model of a checkpoint (any family, any layout) and its model config.

    A LoRA run's checkpoint holds its adapters (and ``model.lora.trainable`` parameters) alone: the
    model is its frozen base (:func:`frozen_base`) with them on it, as the run computed. ``base``
    (``--base``) is for a LoRA run only.
    """
    model_cfg, tensors, where = checkpoint_tensors(checkpoint, use_ema)
    lora = lora_enabled(model_cfg.lora)
    if base is not None and not lora:
        raise ValueError(f"--base {base}: {checkpoint} is not a LoRA run's; it holds every weight itself")
    source = frozen_base(checkpoint, model_cfg, base) if lora else 0
    with torch.random.fork_rng(devices=[]):  # the run's seeded initialisation, leaving the caller's RNG
        torch.manual_seed(source if isinstance(source, int) else 0)
        model = build_model(model_cfg)
    # The checkpoint's tensors first: a bad checkpoint fails before the base is read.
    load_trained(model, tensors, where, frozen_names(model))
    if isinstance(source, Path):
        origin = "--base" if base is not None else "model.init_from_diffusers"
        load_frozen_base(model, model_cfg, source, checkpoint, origin)
    return model.to(device).eval(), model_cfg


def load_model(
    checkpoint: Path, use_ema: bool, device: torch.device, base: Path | None = None
) -> tuple[nn.Module, PackingSpec]:
    """The single-device model of a checkpoint and its packing spec (default embedded guidance)."""
    model, model_cfg = load_model_config(checkpoint, use_ema, device, base)
    return model, packing_spec(model_cfg)


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        type=Path,
        help="a LoRA run's frozen base (a diffusers folder, a consolidated file or a full run's "
        "checkpoint); default: the run's model.init_from_diffusers, else its seeded initialisation",
    )


def run_embedded_guidance(checkpoint: Path) -> float | None:
    """``flow_matching.embedded_guidance`` of the run a checkpoint belongs to; None when unset or
    the run's config.yaml is not found."""
    try:
        value = run_setting(checkpoint, "flow_matching.embedded_guidance")
    except FileNotFoundError:
        return None
    return None if value is None else float(value)


def embedded_guidance(args: argparse.Namespace, model_cfg: Any, checkpoint: Path) -> float | None:
    """The distilled guidance scale to sample a guidance-embedding model at: ``--embedded-guidance``,
    else the run's training value, else DEFAULT_EMBEDDED_GUIDANCE (None for a model without one,
    which refuses the flag when the spec is built)."""
    if args.embedded_guidance is not None:
        return float(args.embedded_guidance)
    if not family(model_cfg).model_inputs(model_cfg).guidance_embedding:
        return None
    value = run_embedded_guidance(checkpoint)
    source = "the run's flow_matching.embedded_guidance" if value is not None else "the default"
    value = DEFAULT_EMBEDDED_GUIDANCE if value is None else value
    log.info("embedded guidance %g (%s; --embedded-guidance sets it)", value, source)
    return value


def guidance_inputs(args: argparse.Namespace, model_cfg: Any) -> tuple[float, Negative | None]:
    """The CFG scale and the unconditional pass's negative (None: text dropout), per the module doc."""
    record = family(model_cfg)
    guidance = float(args.guidance) if args.guidance is not None else record.sampling.guidance
    if guidance == 1.0:
        return guidance, None
    if args.negative is None and record.sampling.negative_required:
        raise ValueError(
            f"--guidance {guidance:g} on {record.name}: say what its unconditional pass is: --negative FILE "
            "(a negative prompt's text_embedding and pooled_text, as diffusers' pipelines run true CFG; "
            "tools/encode_shards.py --negative-prompt writes OUT/negative.safetensors) or --negative "
            "text-dropout (text tokens dropped, the conditional pooled text kept, as text_dropout trains)"
        )
    if args.negative in (None, "text-dropout"):
        return guidance, None
    return guidance, Negative.load(args.negative)


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


def parse_keyframe(value: str) -> Keyframe:
    """``IDX=PATH``: an image at frame IDX; ``IDX=A.png,B.png,...``: a clip of frames from IDX on."""
    index, sep, paths = value.partition("=")
    if not sep or not index.strip().isdigit() or not paths:
        raise ValueError(f"--keyframe '{value}': expected IDX=PATH or IDX=PATH,PATH,... (IDX a frame >= 0)")
    frames = [load_image(Path(path)) for path in paths.split(",")]  # [3, 1, H, W] each
    sizes = {tuple(frame.shape[2:]) for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"--keyframe '{value}': the clip's frames differ in size {sorted(sizes)}")
    return Keyframe(int(index), torch.cat(frames, dim=1))


@dataclass(frozen=True)
class SarInputs:
    """What ``--sar`` generates from, checked: the keyframes as given (pixels ``[3, T, H, W]`` at pixel
    frames) and in model space (through the VAE for a latent model), the video's (C, H, W) in model
    space, its frame size in pixels, and its text (a caption, or precomputed embeddings ``[L, E]``)."""

    given: list[Keyframe]
    keyframes: list[Keyframe]
    size: tuple[int, int, int]
    pixels: tuple[int, int]
    text: str | torch.Tensor | None


def sar_text(args: argparse.Namespace, spec: PackingSpec) -> str | torch.Tensor | None:
    """``--text`` for a model that encodes its text, ``--text-embedding`` for one that reads it precomputed."""
    if spec.text_embed_dim:
        if args.text is not None:
            raise ValueError(
                f"--text: this model reads precomputed text embeddings [L, {spec.text_embed_dim}] "
                "(model.text_encoder: precomputed): give them with --text-embedding FILE"
            )
        return (
            None
            if args.text_embedding is None
            else read_text_embedding(args.text_embedding, spec.text_embed_dim)
        )
    if args.text_embedding is not None:
        raise ValueError("--text-embedding: this model encodes its text itself: give the caption with --text")
    return args.text


def sar_inputs(args: argparse.Namespace, spec: PackingSpec, vae: VideoVAE | None) -> SarInputs:
    """The ``--sar`` inputs, checked against the VAE and the segment plan before anything is sampled.

    A latent model's ``--sar``, ``--window`` and ``--context`` count latent frames; its keyframes'
    IDX are pixel frames of the decoded video, each encoded alone and placed at latent frame
    ``ceil(IDX / temporal)`` (:mod:`imontage.sample.video`)."""
    given = [parse_keyframe(value) for value in args.keyframe]
    sizes = {tuple(k.data.shape[2:]) for k in given}
    if args.size:
        try:
            height, width = (int(n) for n in args.size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size '{args.size}': expected HxW, e.g. 24x32") from None
        sizes.add((height, width))
    if not sizes:
        raise ValueError("--sar: no frame size: pass --size HxW or a --keyframe")
    if len(sizes) > 1:
        raise ValueError(f"--sar: the keyframes and --size give different frame sizes {sorted(sizes)}")
    if args.window is None:
        raise ValueError("--sar needs --window (frames the model generates at once)")
    height, width = sizes.pop()
    text = sar_text(args, spec)
    if vae is None:
        if spec.in_channels != 3:
            raise ValueError(
                f"--sar: the model generates {spec.in_channels}-channel latents: give its VAE with --vae "
                "(keyframes are encoded with it and the video decoded)"
            )
        keyframes, size = given, (spec.in_channels, height, width)
    else:
        if vae.channels != spec.in_channels:
            raise ValueError(
                f"--vae {args.vae}: {vae.channels} latent channels, the model takes {spec.in_channels}"
            )
        cell = keyframe_cell(vae, spec.patch_size)
        if height % cell[0] or width % cell[1]:
            raise ValueError(
                f"--sar: frames of {height}x{width} pixels; this model's need a height that is a multiple of "
                f"{cell[0]} and a width of {cell[1]} (the VAE's {vae.spatial}-pixel cell times the model's patch)"
            )
        frames = pixel_frames(vae, args.sar)
        keyframes = []
        for value, keyframe in zip(args.keyframe, given, strict=True):
            last = keyframe.frame + keyframe.num_frames - 1
            if last >= frames:
                raise ValueError(
                    f"--keyframe '{value}': pixel frames {keyframe.frame}..{last}, outside the video's "
                    f"0..{frames - 1} ({args.sar} latent frames)"
                )
            keyframes.append(encode_keyframe(vae, keyframe, cell, f"--keyframe '{value}'"))
        size = (vae.channels, height // vae.spatial, width // vae.spatial)
    plan_video(spec, args.sar, size, args.window, args.context, keyframes)  # bad arguments fail here
    return SarInputs(given, keyframes, size, (height, width), text)


def video_path(out: Path) -> Path:
    """The MP4 written beside the grid ``out``: the same name, suffix ``.mp4``."""
    path = out.with_suffix(".mp4")
    if path == out:
        raise ValueError(f"--out {out}: the grid is a PNG; the SAR video is written beside it as {path.name}")
    return path


def sar_video(
    args: argparse.Namespace,
    model: nn.Module,
    spec: PackingSpec,
    inputs: SarInputs,
    decoder: StreamingDecoder | None,
    mp4: Path,
    device: torch.device,
    guidance: float,
) -> list[list[list[np.ndarray]]]:
    """Generate the ``--sar`` video, writing it to the MP4 beside ``--out`` segment by segment; grid
    rows of 8-bit frames, one per segment: [its keyframes, the frames it generated], in pixels."""
    generator = torch.Generator().manual_seed(args.seed)
    segments = iter_sar(
        model, spec, args.sar, inputs.size, args.window, args.context, inputs.keyframes, inputs.text,
        args.steps, guidance, args.shift, generator, device,
    )  # fmt: skip
    vae = None if decoder is None else decoder.vae
    rows = []
    with Mp4Writer(mp4, *inputs.pixels, args.fps or DEFAULT_FPS) as writer:
        for segment, pixels in stream_video(segments, decoder, writer):
            given = []
            for piece in segment.keyframes:
                first, last = (
                    (piece.first, piece.last) if vae is None else pixel_span(vae, piece.first, piece.last)
                )
                given += to_frames(inputs.given[piece.keyframe].data[:, first:last])
            rows.append([given, to_frames(pixels)])
            log.info("SAR segment %d: frames %d..%d", segment.index, segment.new_start, segment.end - 1)
    return rows


def decode_rows(rows: list[list[list[torch.Tensor]]], vae: Any) -> list[list[list[torch.Tensor]]]:
    """Grid rows of a latent model with every latent segment ``[C, T', H', W']`` decoded to pixels by
    ``vae`` (an imontage.dataprep.encode.VideoVAE: the normalisation of latent shards undone); with no
    VAE, the rows as they are."""
    if vae is None:
        return rows
    return [
        [[vae.decode(x) if x.shape[0] == vae.channels else x for x in group] for group in row] for row in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imontage-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint folder, or a run directory (uses its latest)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="shards to take conditions (and ground truth) from")
    source.add_argument("--prompts", type=Path, help="JSONL prompt file (see the module docstring)")
    source.add_argument("--sar", type=int, metavar="FRAMES", help="one long video, segment by segment")
    parser.add_argument("--num", type=int, default=8, help="samples to take from --data")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default 3; HunyuanVideo: 1, none)"
    )
    parser.add_argument(
        "--negative",
        metavar="FILE|text-dropout",
        help="the unconditional pass: a negative prompt's embeddings (safetensors: text_embedding, "
        "pooled_text), or text-dropout (the sample without its text tokens; default but for HunyuanVideo)",
    )
    parser.add_argument(
        "--embedded-guidance",
        type=float,
        help="distilled guidance of a guidance-embedding HunyuanVideo (default: the run's "
        "flow_matching.embedded_guidance, else 1; diffusers' T2V pipeline defaults to 6)",
    )
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="sample with the live weights")
    add_base_argument(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--vae",
        type=Path,
        help="diffusers VAE folder: a latent model's segments are decoded to pixels for the grid "
        "(--sar: and its keyframes encoded, its video decoded)",
    )
    sar = parser.add_argument_group("--sar", "segment-wise auto-regressive video (a `shared` layout model)")
    sar.add_argument("--window", type=int, help="frames per segment (the model's window)")
    sar.add_argument("--context", type=int, default=1, help="frames a segment takes from the one before")
    sar.add_argument(
        "--keyframe",
        action="append",
        default=[],
        metavar="IDX=PATH[,PATH...]",
        help="an image (or clip) from frame IDX on; with --vae, IDX is a pixel frame of the decoded video",
    )
    sar.add_argument("--text", help="the video's caption")
    sar.add_argument(
        "--text-embedding",
        type=Path,
        metavar="FILE",
        help="the caption's precomputed text [L, E] (.safetensors/.npy), for model.text_encoder=precomputed",
    )
    sar.add_argument("--size", metavar="HxW", help="frame size in pixels, when no keyframe gives it")
    sar.add_argument("--fps", type=int, help=f"frame rate of the MP4 (default {DEFAULT_FPS})")
    args = parser.parse_args(argv)
    sar_options = ("window", "keyframe", "text", "text_embedding", "size", "fps")
    sar_only = [name.replace("_", "-") for name in sar_options if getattr(args, name)]
    if sar_only and args.sar is None:
        parser.error(f"--sar options without --sar: --{', --'.join(sar_only)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        device = resolve_device(args.device)
        vae = None
        if args.vae:
            check_vae_folder(args.vae)  # untrusted: its weights must be what its config describes
            vae = VideoVAE.load(args.vae, device)
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, model_cfg = load_model_config(checkpoint, not args.no_ema, device, args.base)
        spec = packing_spec(model_cfg, embedded_guidance(args, model_cfg, checkpoint))
        guidance, negative = guidance_inputs(args, model_cfg)
        clean = clean_first_frame(model_cfg)  # token_replace: target videos keep their first frame
        if args.sar is not None:
            if negative is not None:
                raise ValueError(
                    "--sar samples with text dropout's unconditional pass; --negative FILE is for --data"
                )
            if clean:
                raise ValueError(
                    "--sar: this model keeps each target's first latent frame as given (token_replace); "
                    "SAR segments give none"
                )
            inputs = sar_inputs(args, spec, vae)
            decoder = None if vae is None else StreamingDecoder(vae)
            mp4 = video_path(args.out)
        elif args.data:
            # A model without a text encoder of its own (Wan, precomputed text) reads each
            # sample's text_embedding member, as training does with data.text_embeddings; the
            # spec has the loader read what else the model takes (pooled text, guidance, conditions).
            embeddings = getattr(model, "text_encoder", None) is None
            data = OmegaConf.create({"shards": args.data, "text_embeddings": embeddings})
            samples = preview_samples(data, args.num, spec)
            if not samples:
                raise ValueError(f"--data {args.data}: no sample there fits the model (or has what it reads)")
        elif spec.pooled_text_dim or spec.image_embed_dim or spec.channel_condition:
            raise ValueError(
                "--prompts gives text and images only; this model reads precomputed per-sample inputs "
                "(pooled text, image tokens, channel conditions): sample it from latent shards with --data"
            )
        else:
            samples = read_prompts(args.prompts, spec.in_channels)
    except (OSError, KeyError, ValueError, RuntimeError) as error:  # bad inputs: say which, no traceback
        print(f"imontage-sample: {error}", file=sys.stderr)
        return 2
    if args.sar is not None:
        frames = sar_video(args, model, spec, inputs, decoder, mp4, device, guidance)
        save_png(frame_grid(frames), args.out)
        count = sum(len(row[1]) for row in frames)
        print(
            f"wrote {args.out} and {mp4} ({count} frames of {inputs.pixels[0]}x{inputs.pixels[1]}, "
            f"{len(inputs.keyframes)} keyframes, from {checkpoint})"
        )
        return 0
    generator = torch.Generator().manual_seed(args.seed)
    outputs = sample_flow(
        model, samples, spec, args.steps, guidance, args.shift, generator, device,
        negative=negative, clean_first_frame=clean,
    )  # fmt: skip
    rows = preview_rows(samples, outputs)
    if args.prompts:  # no ground truth: drop the zero placeholders
        rows = [row[:2] for row in rows]
    save_png(make_grid(decode_rows(rows, vae)), args.out)
    print(f"wrote {args.out} ({len(samples)} samples from {checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latent shards with everything the pretrained families read besides tokens, from tiny random encoders.

    from conditioned_shards import write_conditioned_shards
    spec = write_conditioned_shards(tmp_path)  # image-to-video samples: pooled text, CLIP image tokens,
                                               # Wan I2V condition latents (tools/encode_shards.py's members)

Built on tests/latent_shards.py (its tiny VAE, UMT5 and CLIP text model); this adds a tiny CLIP
vision model with its image processor.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path

from latent_shards import POOLED_DIM, Samples, save_tiny_clip, save_tiny_encoders, write_pixel_shards

from imontage.dataprep.encode import Encoders, EncodeSettings, encode_shards
from imontage.dataprep.testing import image_bytes, video_bytes

IMAGE_DIM = 8  # width of the tiny CLIP vision model's tokens
IMAGE_TOKENS = 5  # its 2x2 patches of a 32x32 crop and the class token
I2V_TEXTS = ("the red square moves left", "a blue circle moves up", "the green square moves down")


def save_tiny_clip_vision(folder: Path) -> Path:
    """A 2-layer CLIP vision model (tokens of width IMAGE_DIM) and a CLIPImageProcessor at 32x32."""
    transformers = importlib.import_module("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=16,
    )  # fmt: skip
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(folder)
    return folder


def i2v_samples(count: int = 6) -> Samples:
    """(key, members) of image-to-video samples: a 32x48 condition image and a 5-frame 32x48 target clip."""
    out = []
    for index in range(count):
        members = {
            "0.png": image_bytes(32, 48, "png", seed=index),
            "1.mp4": video_bytes(5, 32, 48, seed=index),
        }
        segments = [{"role": "condition", "kind": "image", "member": "0.png"},
                    {"role": "target", "kind": "video", "member": "1.mp4"}]  # fmt: skip
        record = {"task": "i2v", "text": I2V_TEXTS[index % len(I2V_TEXTS)], "segments": segments}
        out.append((f"{index:06d}", {**members, "json": json.dumps(record).encode()}))
    return out


def write_conditioned_shards(
    folder: Path,
    shards: Sequence[Samples] | None = None,
    i2v: bool = True,
    negative_prompt: str | None = None,
) -> str:
    """Pixel shards (default: six :func:`i2v_samples` in two) encoded with pooled text and, with
    ``i2v``, image tokens and I2V condition latents into ``folder/latents``; returns the latent spec.
    The I2V samples' latents are ``[4, 2, 4, 6]`` (the clip) and ``[4, 1, 4, 6]`` (the image). With
    ``negative_prompt``, ``folder/latents/negative.safetensors`` holds that text's embeddings."""
    models = save_tiny_encoders(folder / "models")
    clip = save_tiny_clip(folder / "models" / "clip")
    vision = save_tiny_clip_vision(folder / "models" / "clip_vision") if i2v else None
    if shards is None:
        samples = i2v_samples()
        shards = [samples[:3], samples[3:]]
    spec = write_pixel_shards(folder / "pixels", shards)
    encoders = Encoders.load(
        models["vae"], models["text_encoder"], models["tokenizer"], str(clip), models["tokenizer"],
        image=None if vision is None else str(vision), i2v_condition=i2v,
    )  # fmt: skip
    settings = EncodeSettings(negative_prompt=negative_prompt)
    encode_shards(spec, folder / "latents", encoders, settings=settings, progress=False)
    return str(folder / "latents" / "pixels-*.tar")


__all__ = [
    "IMAGE_DIM",
    "IMAGE_TOKENS",
    "POOLED_DIM",
    "i2v_samples",
    "save_tiny_clip_vision",
    "write_conditioned_shards",
]

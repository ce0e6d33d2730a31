"""Tiny random encoders and a small latent shard set, for tests that train on or read latent shards.

    from latent_shards import write_latent_shards
    spec = write_latent_shards(tmp_path)  # 3 shards of pixel samples encoded by a tiny random Wan VAE + UMT5
    spec = write_latent_shards(tmp_path, [keyframe_samples(4), keyframe_samples(2, pairs=True)])  # 2 shards

Nothing is downloaded: the VAE, the text encoder and a word-level tokenizer are built from small
configs and saved with ``save_pretrained``, as real model folders are laid out.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path

from imontage.data.shards import ShardWriter
from imontage.dataprep.encode import Encoders, EncodeSettings, encode_shards
from imontage.dataprep.testing import image_bytes, video_bytes

LATENT_CHANNELS = 4
TEXT_DIM = 16
POOLED_DIM = 8
WORDS = [
    "a",
    "the",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "moves",
    "left",
    "right",
    "up",
    "down",
    "image",
    "video",
    "sample",
    "of",
]
VOCAB_SIZE = 3 + len(WORDS) + 10  # specials, words, digits
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.5, 2.0, 1.0]
Samples = list[tuple[str, dict[str, bytes]]]  # (key, members) of one shard's samples


def save_tiny_vae(folder: Path, family: str = "wan") -> Path:
    diffusers = importlib.import_module("diffusers")
    if family == "wan":
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
        )  # fmt: skip
    else:
        vae = diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, mid_block_add_attention=False,
        )  # fmt: skip
    vae.save_pretrained(folder)
    return folder


def save_tiny_text_encoder(folder: Path) -> tuple[Path, Path]:
    """(text encoder folder, tokenizer folder): a 1-layer UMT5 encoder and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    transformers = importlib.import_module("transformers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    for digit in range(10):
        vocab[str(digit)] = len(vocab)
    assert len(vocab) == VOCAB_SIZE
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer_dir, model_dir = folder / "tokenizer", folder / "text_encoder"
    tokenizer.save_pretrained(tokenizer_dir)
    config = transformers.UMT5Config(
        vocab_size=VOCAB_SIZE, d_model=TEXT_DIM, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    transformers.UMT5EncoderModel(config).save_pretrained(model_dir)
    return model_dir, tokenizer_dir


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<unk>"]  # fmt: skip
LLAMA_LAYERS = 3  # hidden_states holds 4: the embeddings, then each layer's (the last one normed)


def save_tiny_llama(folder: Path) -> tuple[Path, Path]:
    """(text encoder folder, tokenizer folder): a 3-layer random LlamaModel (hidden size TEXT_DIM) and a
    word-level tokenizer with Llama 3's special tokens (one token each, ``<|begin_of_text|>`` first,
    ``<|end_of_text|>`` padding on the right): the tiny stand-in for HunyuanVideo's ``text_encoder``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    transformers = importlib.import_module("transformers")
    vocab = {token: i for i, token in enumerate(LLAMA_SPECIALS)}
    for word in [*WORDS, *map(str, range(10))]:
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.add_special_tokens([AddedToken(token, special=True) for token in LLAMA_SPECIALS])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>", unk_token="<unk>", padding_side="right",
    )  # fmt: skip
    tokenizer_dir, model_dir = folder / "llama_tokenizer", folder / "llama"
    tokenizer.save_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1,
        bos_token_id=0, eos_token_id=4,
    )  # fmt: skip
    transformers.LlamaModel(config).save_pretrained(model_dir)
    return model_dir, tokenizer_dir


def save_tiny_clip(folder: Path) -> Path:
    """A 1-layer CLIP text model (pooled output of size POOLED_DIM) for the tokenizer of
    :func:`save_tiny_text_encoder` (EOS id 1), with CLIP-L's 77 positions (the pipelines pad to 77)."""
    transformers = importlib.import_module("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=POOLED_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    transformers.CLIPTextModel(config).save_pretrained(folder)
    return folder


def _sample(task: str, text: str, members: dict[str, bytes], segments: list[dict]) -> dict[str, bytes]:
    record = {"task": task, "text": text, "segments": segments, "source": "tests"}
    return {**members, "json": json.dumps(record).encode()}


def pixel_samples() -> list[tuple[str, dict[str, bytes], dict]]:
    """(key, members, expected) per sample: images and a 5-frame clip; ``expected`` has the pixel
    shape each segment decodes back to and the text's token count (words + EOS)."""
    out = []
    for index in range(5):
        size = ((32, 32), (32, 48), (48, 32))[index % 3]
        text = f"image sample {index} red circle"
        members = {
            "0.png": image_bytes(32, 32, "png", seed=index),
            "1.png": image_bytes(*size, "png", seed=99 + index),
        }
        segments = [{"role": "condition", "kind": "image", "member": "0.png"},
                    {"role": "target", "kind": "image", "member": "1.png"}]  # fmt: skip
        out.append((f"{index:06d}", _sample("image", text, members, segments),
                    {"pixels": [[3, 1, 32, 32], [3, 1, *size]], "tokens": 6}))  # fmt: skip
    for index in range(5, 7):
        members = {
            "0.png": image_bytes(32, 48, "png", seed=index),
            "1.mp4": video_bytes(6, 32, 48, seed=index),
        }
        segments = [{"role": "condition", "kind": "image", "member": "0.png"},
                    {"role": "target", "kind": "video", "member": "1.mp4"}]  # fmt: skip
        # 6 frames: the VAE encodes 1 + 4k of them whole, so 5 are kept.
        out.append((f"{index:06d}", _sample("video", "the blue square moves left", members, segments),
                    {"pixels": [[3, 1, 32, 48], [3, 5, 32, 48]], "tokens": 6}))  # fmt: skip
    return out


def keyframe_samples(count: int, pairs: bool = False) -> Samples:
    """(key, members) of ``count`` DreaMontage-shaped samples: keyframe images anchored at pixel
    frames 0 and 4 of a 5-frame 32x48 clip (latent frames 0 and 1 of 2: the ``shared`` layout's
    anchors). With ``pairs``, two clips in groups win and lose instead of one target (flow DPO's
    pairs: each decodes to two training samples)."""
    out = []
    for index in range(count):
        members = {f"{n}.png": image_bytes(32, 48, "png", seed=10 * n + index) for n in (0, 1)}
        segments = [{"role": "condition", "kind": "image", "member": "0.png", "anchor": 0},
                    {"role": "condition", "kind": "image", "member": "1.png", "anchor": 4}]  # fmt: skip
        groups = ("win", "lose") if pairs else (None,)
        for number, group in enumerate(groups):
            members[f"{2 + number}.mp4"] = video_bytes(5, 32, 48, seed=20 + 10 * number + index)
            segments.append({"role": "target", "kind": "video", "member": f"{2 + number}.mp4",
                             **({"group": group} if group else {})})  # fmt: skip
        key = f"{index + 10 * pairs:06d}"
        out.append((key, _sample("keyframes", "the red circle moves left", members, segments)))
    return out


SHARD_KEYS = (("000000", "000001", "000005"), ("000002", "000003"), ("000004", "000006"))


def write_pixel_shards(folder: Path, shards: Sequence[Samples] | None = None) -> str:
    """Three input shards of :func:`pixel_samples` (keys as in SHARD_KEYS), or one shard per list of
    ``shards`` (``pixels-000000.tar``, ...); returns their spec."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards is None:
        by_key = {key: members for key, members, _ in pixel_samples()}
        shards = [[(key, by_key[key]) for key in keys] for keys in SHARD_KEYS]
    for number, samples in enumerate(shards):
        with ShardWriter(folder / f"pixels-{number:06d}.tar") as writer:
            for key, members in samples:
                writer.add_sample(key, members)
    return str(folder / "pixels-*.tar")


def save_tiny_wan(folder: Path) -> Path:
    """A random diffusers WanTransformer3DModel with the config of configs/model/wan_tiny.yaml
    (text_dim TEXT_DIM): the tiny stand-in for a Wan 2.1 ``transformer/`` folder."""
    from omegaconf import OmegaConf

    from imontage.checkpoint.diffusers import build_diffusers_model
    from imontage.config.schema import ModelConfig

    preset = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/model/wan_tiny.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, {"text_dim": TEXT_DIM})
    build_diffusers_model(cfg).save_pretrained(folder)
    return folder


def save_tiny_encoders(folder: Path) -> dict[str, str]:
    """``{"vae", "text_encoder", "tokenizer"}`` folders of tiny random models."""
    vae = save_tiny_vae(folder / "vae")
    text, tokenizer = save_tiny_text_encoder(folder)
    return {"vae": str(vae), "text_encoder": str(text), "tokenizer": str(tokenizer)}


def write_latent_shards(folder: Path, shards: Sequence[Samples] | None = None) -> str:
    """Pixel shards (:func:`write_pixel_shards`) encoded into ``folder/latents`` by tiny random
    encoders; returns the latent spec.

    Latents have LATENT_CHANNELS channels at 1/8 of the pixel size (4x4, 4x6, 6x4; the clip 2
    latent frames); text embeddings are ``[6, TEXT_DIM]``.
    """
    models = save_tiny_encoders(folder / "models")
    spec = write_pixel_shards(folder / "pixels", shards)
    encoders = Encoders.load(models["vae"], models["text_encoder"], models["tokenizer"])
    encode_shards(spec, folder / "latents", encoders, settings=EncodeSettings(), progress=False)
    return str(folder / "latents" / "pixels-*.tar")

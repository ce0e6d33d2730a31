"""Pixel shards to latent shards: a VAE on every visual segment, a text encoder on the text.

Each input sample is read and decoded by the training reader (:func:`decode_item`: the same
schema, checks and decoders), each image or video segment goes through the VAE and becomes a
``latent`` segment (a ``.safetensors`` member, normalised as the VAE's pipelines normalise),
the text goes through the text encoder and becomes a ``text_embedding`` member ``[L, E]`` of the
valid tokens only. Other json fields are kept; the json gains ``latent`` (the VAE, the
normalisation applied, the pixel shape each latent decodes to) and ``text_encoder``. On request
it also stores what the pretrained families read per sample: a pooled text vector (HunyuanVideo's
CLIP-L, ``pooled_text``), the condition image's CLIP vision tokens (Wan 2.1 I2V, ``image_embeds``)
and each target's Wan I2V condition latent (``condition_latent``). The training loader reads the
result with ``data.text_embeddings: true`` and ``model.text_encoder: precomputed``. docs/data.md
("Latent shards", "Model inputs") has the schema.

An output shard is a function of its input shard: each rank encodes whole input shards
(``shards[rank::world]``), writes each under ``OUT/<input file name>`` only when complete (a
``.partial`` file renamed into place, then its index beside it), and a rerun skips the shards
already there. So a run killed half way and started again finishes without redoing finished
shards and without losing or duplicating a sample.

VAEs: diffusers ``AutoencoderKLWan`` (normalised ``(z - latents_mean) / latents_std``, as the Wan
pipelines do; Wan 2.2's 48-channel VAE is one of its configs), ``AutoencoderKLHunyuanVideo`` and
HunyuanVideo 1.5's ``AutoencoderKLHunyuanVideo15`` (``z · scaling_factor``), picked by the
``_class_name`` of the folder's ``config.json``. Text: a transformers encoder
(``UMT5EncoderModel``, ...) and its tokenizer, from local folders, under a :class:`TextRecipe`: the
last hidden state (Wan), or HunyuanVideo's (the prompt template, ``hidden_states[-3]``, the
template's tokens cropped, as diffusers' ``HunyuanVideoPipeline`` computes it), or another family's
(``ModelFamily.text_encoding``: HunyuanVideo 1.5's Qwen2.5-VL chat), with the family's second text
encoder (``text_encoding_2``: HunyuanVideo 1.5's ByT5 on the glyph text, ``text_embedding_2``) and its
image encoder (``image_encoding``: HunyuanVideo 1.5's SigLIP). The pooled text is
the ``pooler_output`` diffusers' HunyuanVideo pipelines read from CLIP. Nothing is downloaded and
nothing is loaded with pickle (``use_safetensors=True``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from imontage import untrusted
from imontage.data import media
from imontage.data.decode import DecodeOptions, check_array_members, decode_item
from imontage.data.index import read_sidecar, scan_shard, write_index
from imontage.data.problems import DataError
from imontage.data.records import ARRAY_FIELDS, SampleRecord, extension, parse_record
from imontage.data.shards import RawSample, ShardProblem, ShardWriter, expand_shards, read_shard
from imontage.dataprep.image_text import TEXT_IMAGES, ImageTextEncoder, text_image
from imontage.dataprep.keyframes import KeyframeSelection, carry_keyframes, encode_keyframes
from imontage.models.common.family import ImageEncoding, ImageInText, TextEncoding, VaeSpec
from imontage.models.common.sequence import patch_grid
from imontage.models.registry import FAMILIES

log = logging.getLogger(__name__)

LATENT_TENSOR = "latent"  # the tensor's name in a latent member
TEXT_TENSOR = "text_embedding"  # the tensor's name in the text member
TEXT_MEMBER = "text.safetensors"
TEXT_2_MEMBER = "text_2.safetensors"  # a second text encoder's rows (tensor TEXT_TENSOR)
TEXT_2_TENSOR = "text_embedding_2"  # their tensor's name in OUT/negative.safetensors
POOLED_TENSOR = "pooled_text"
POOLED_MEMBER = "pooled_text.safetensors"
IMAGE_TENSOR = "image_embeds"
IMAGE_MEMBER = "image_embeds.safetensors"
CONDITION_TENSOR = "condition_latent"  # the tensor's name in a target's condition latent member
MANIFEST = "encode.json"  # OUT/encode.json: what every shard of the folder was encoded with
# OUT/negative.safetensors: the negative prompt's text_embedding and pooled_text (--negative-prompt)
NEGATIVE = "negative.safetensors"
# The VAEs the registered families' pipelines encode with, by diffusers class (ModelFamily.vaes).
VAES: dict[str, VaeSpec] = {vae.class_name: vae for record in FAMILIES.values() for vae in record.vaes}
VAE_CLASSES = tuple(VAES)
LATENT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_PATCH_SIZE = (1, 2, 2)  # (pt, ph, pw) of every shipped latent preset (configs/model/)


def latent_member(index: int, suffix: str = "safetensors") -> str:
    """Member name of visual segment ``index``'s latent (``0.latent.safetensors``)."""
    return f"{index}.latent.{suffix}"


def condition_member(index: int, suffix: str = "safetensors") -> str:
    """Member name of target segment ``index``'s image-to-video condition latent (``1.condition.safetensors``)."""
    return f"{index}.condition.{suffix}"


# ---------------------------------------------------------------------------------------------
# importing diffusers / transformers from a checkout


# ---------------------------------------------------------------------------------------------
# normalisation and the VAE


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel ``stored = (z - shift) · scale``; decoding takes ``z = stored / scale + shift``."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))

    def apply(self, latent: torch.Tensor) -> torch.Tensor:  # [C, T, H, W]
        return (latent - self._view(self.shift, latent)) * self._view(self.scale, latent)

    def invert(self, stored: torch.Tensor) -> torch.Tensor:  # [C, T, H, W]
        return stored / self._view(self.scale, stored) + self._view(self.shift, stored)

    def to_json(self) -> dict[str, list[float]]:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentNorm:
        return cls(tuple(float(v) for v in data["shift"]), tuple(float(v) for v in data["scale"]))


def vae_class_name(folder: str | os.PathLike[str]) -> str:
    config = Path(folder) / "config.json"
    name = untrusted.field(untrusted.read_json(config, dict), "_class_name", str, config)
    if name not in VAE_CLASSES:
        raise ValueError(f"{config}: VAE class {name} is not one of {', '.join(VAE_CLASSES)}")
    return str(name)


def latent_norm(class_name: str, config: Any) -> LatentNorm:
    """The normalisation the family's diffusers pipelines apply to the VAE's latents."""
    latents = VAES[class_name].latents(config)
    return LatentNorm(latents.shift, latents.scale)


class VideoVAE:
    """A diffusers video VAE with its normalisation: pixels ``[3, T, H, W]`` in [-1, 1] <-> latents."""

    def __init__(self, vae: Any, class_name: str, sample_posterior: bool = False) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.class_name = class_name
        latents = VAES[class_name].latents(vae.config)
        self.norm = LatentNorm(latents.shift, latents.scale)
        self.sample_posterior = sample_posterior  # default: the posterior's mode, deterministic
        self.temporal, self.spatial, self.channels = latents.temporal, latents.spatial, latents.channels

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        sample_posterior: bool = False,
        tiling: bool = False,
    ) -> VideoVAE:
        """``tiling``: encode and decode in overlapping spatial tiles (diffusers' ``enable_tiling``),
        for frames too large for the device's memory; the result differs slightly at tile seams."""
        name = vae_class_name(folder)
        model = getattr(importlib.import_module("diffusers"), name).from_pretrained(
            os.fspath(folder), use_safetensors=True, torch_dtype=dtype
        )
        if tiling:
            model.enable_tiling()
        return cls(model.to(device), name, sample_posterior)

    @property
    def tiling(self) -> bool:
        return bool(getattr(self.vae, "use_tiling", False))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def fit(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[3, T, H, W]`` trimmed to what the VAE encodes whole: ``1 + k·temporal`` frames (the
        first ones), height and width multiples of ``spatial`` (centre crop)."""
        _, frames, height, width = pixels.shape
        keep_t = 1 + (frames - 1) // self.temporal * self.temporal
        keep_h, keep_w = height // self.spatial * self.spatial, width // self.spatial * self.spatial
        if keep_h == 0 or keep_w == 0:
            raise ValueError(f"{height}x{width} pixels is smaller than the VAE's {self.spatial}-pixel cell")
        top, left = (height - keep_h) // 2, (width - keep_w) // 2
        return pixels[:, :keep_t, top : top + keep_h, left : left + keep_w]

    def latent_shape(self, pixels: Sequence[int]) -> tuple[int, int, int, int]:
        """``[C, T', H', W']`` of the latent of fitted pixels ``[3, T, H, W]`` (see :meth:`fit`)."""
        _, frames, height, width = pixels
        return self.channels, 1 + (frames - 1) // self.temporal, height // self.spatial, width // self.spatial

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        """Normalised latent ``[C, T', H', W']`` (float32) of fitted pixels ``[3, T, H, W]``; ``mode``:
        the posterior's mode whatever ``sample_posterior`` says."""
        batch = pixels.to(self.device, self.dtype).unsqueeze(0)  # [1, 3, T, H, W]
        posterior = self.vae.encode(batch).latent_dist
        latent = posterior.sample(generator) if self.sample_posterior and not mode else posterior.mode()
        return self.norm.apply(latent[0].float())

    def i2v_condition(self, image: torch.Tensor, frames: int) -> torch.Tensor:
        """Wan 2.1 I2V's condition latent ``[C, T', H', W']`` for a target of ``frames`` pixel frames:
        the image ``[3, 1, H, W]`` followed by ``frames - 1`` zero-valued frames through the VAE,
        normalised, the posterior's mode (diffusers' ``WanImageToVideoPipeline.prepare_latents``)."""
        padded = torch.cat([image, image.new_zeros(3, frames - 1, *image.shape[2:])], dim=1)
        return self.encode(padded, mode=True)

    @torch.no_grad()
    def decode(self, stored: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
        """Pixels ``[3, T, H, W]`` in [-1, 1] (float32, CPU) of a stored latent ``[C, T', H', W']``,
        undoing ``norm`` (default: this VAE's)."""
        latent = (norm or self.norm).invert(stored.float().to(self.device))
        pixels = self.vae.decode(latent.to(self.dtype).unsqueeze(0)).sample[0]
        return pixels.float().clamp(-1, 1).cpu()


# ---------------------------------------------------------------------------------------------
# the text encoder


@dataclass(frozen=True)
class TextRecipe:
    """How a text encoder's output becomes the stored text embeddings ``[L, E]``.

    The part of the text ``select`` picks (all of it without one; when it picks nothing, nothing
    is encoded) is put into ``template`` (``template.format(text)``), or with ``chat_system`` made
    the user turn of a chat with that system message through the tokenizer's chat template (the
    assistant's turn opened; an empty text is the user turn " ", as diffusers' HunyuanVideo 1.5
    pipelines give it), tokenised (truncated to ``max_length + crop_start`` tokens; with ``pad``,
    padded to that length as well), run through the encoder with its attention mask; the hidden
    state ``hidden_state`` (an index into ``hidden_states``; None: ``last_hidden_state``) is taken,
    its first ``crop_start`` tokens (the template's) dropped, and the attention-masked valid tokens
    kept.
    """

    name: str
    template: str = "{}"
    crop_start: int = 0
    hidden_state: int | None = None
    max_length: int = 512  # default truncation (after the crop), the family pipeline's
    pad: bool = False  # pad to the truncation length, as the family's pipeline runs the encoder
    chat_system: str | None = None
    select: Callable[[str], str | None] | None = None
    image: ImageInText | None = None  # the encoder sees an image too (imontage.dataprep.image_text)
    images: str = "first"  # with ``image``: which (``--text-images``, one of TEXT_IMAGES)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "template": self.template, "crop_start": self.crop_start,
               "hidden_state": self.hidden_state, "pad": self.pad}  # fmt: skip
        # Only when set: the manifests of folders encoded before stay valid.
        if self.chat_system is not None:
            out["chat_system"] = self.chat_system
        if self.select is not None:
            out["select"] = f"{self.select.__module__}.{self.select.__qualname__}"
        if self.image is not None:
            out.update(image=vars(self.image), images=self.images)
        return out

    @classmethod
    def named(cls, name: str, second: bool = False, images: str = "first") -> TextRecipe:
        """The recipe ``name`` (one of :data:`TEXT_RECIPES`); ``second``: for the family's second
        text encoder (``ModelFamily.text_encoding_2``).

        - ``last_hidden_state``: the text as it is, the last hidden state of its tokens (UMT5 for Wan).
        - a family's name: what that family's pipeline feeds its transformer
          (``ModelFamily.text_encoding``; HunyuanVideo: its Llama prompt template, ``crop_start`` 95,
          the third-to-last hidden state, 256 tokens, padded).
        - another text recipe of a family (``ModelFamily.other_text_encodings``; HunyuanVideo-I2V's,
          whose encoder also sees the image ``images`` names: :mod:`imontage.dataprep.image_text`).
        """
        if name == "last_hidden_state" and not second:
            return cls(name)
        if images not in TEXT_IMAGES:
            raise ValueError(f"--text-images {images} is not one of {', '.join(TEXT_IMAGES)}")
        record = FAMILIES.get(name)
        encoding_of = None if record is None else record.text_encoding_2 if second else record.text_encoding
        if not second:
            encoding_of = OTHER_TEXT_RECIPES.get(name, encoding_of)
        if encoding_of is None:
            if second:
                raise ValueError(
                    f"text recipe '{name}' runs no second text encoder (--text-encoder-2); the families "
                    f"whose pipelines run one: {', '.join(SECOND_TEXT_RECIPES) or 'none'}"
                )
            raise ValueError(f"text recipe '{name}' is not one of {', '.join(TEXT_RECIPES)}")
        encoding = encoding_of()
        return cls(
            name, encoding.template, encoding.crop_start, encoding.hidden_state, encoding.max_length,
            encoding.pad, encoding.chat_system, encoding.select, encoding.image, images,
        )  # fmt: skip


# The families' other text recipes, by name (HunyuanVideo-I2V's).
OTHER_TEXT_RECIPES: dict[str, Callable[[], TextEncoding]] = {
    name: encoding for record in FAMILIES.values() for name, encoding in record.other_text_encodings
}
# The plain one, then one per family that says how its pipeline encodes text, then the others.
TEXT_RECIPES = (
    "last_hidden_state",
    *(n for n, r in FAMILIES.items() if r.text_encoding is not None),
    *OTHER_TEXT_RECIPES,
)
# The families whose pipelines run a second text encoder (--text-encoder-2).
SECOND_TEXT_RECIPES = tuple(n for n, r in FAMILIES.items() if r.text_encoding_2 is not None)


# The transformers classes of text and image encoder folders whose config names none.
TEXT_ENCODER_CLASS, IMAGE_ENCODER_CLASS = "UMT5EncoderModel", "CLIPVisionModel"


def pretrained_model(folder: str | os.PathLike[str], default: str, dtype: torch.dtype) -> Any:
    """The transformers model of ``folder`` (the class its config names, else ``default``), from
    safetensors only, every parameter filled from the folder's weights: transformers fills what
    they lack (a config with more layers than its weights) at random, with a warning, which would
    change every encoding silently; that is refused here, naming the folder. (tools/encode_shards.py
    first checks the folder on the meta device: imontage.checkpoint.components.)"""
    transformers = importlib.import_module("transformers")
    config = transformers.AutoConfig.from_pretrained(os.fspath(folder))
    architecture = (config.architectures or [default])[0]
    named = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not (isinstance(named, type) and issubclass(named, transformers.PreTrainedModel)):
        raise ValueError(f"{folder}: its config names {architecture!r}, not a transformers model class")
    model_class: Any = named
    try:
        model, info = model_class.from_pretrained(
            os.fspath(folder), use_safetensors=True, dtype=dtype, output_loading_info=True
        )
    except RuntimeError as error:  # tensors of other shapes than the config's
        raise ValueError(
            f"{folder}: its weights do not fit the {architecture} its config describes"
        ) from error
    missing = [*info.get("missing_keys", ()), *(name for name, *_ in info.get("mismatched_keys", ()))]
    if missing:
        raise ValueError(
            f"{folder}: its weights lack {len(missing)} tensors of the {architecture} its config describes "
            f"({sorted(missing)[0]}, ...), which would be left at random"
        )
    return model


class TextEncoder:
    """A transformers text encoder and its tokenizer: text -> ``[L, E]`` of its valid tokens
    (:class:`TextRecipe`), or one pooled vector ``[E]``."""

    def __init__(
        self, model: Any, tokenizer: Any, max_length: int = 512, recipe: TextRecipe | None = None
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.recipe = recipe or TextRecipe("last_hidden_state")

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        tokenizer_folder: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        recipe: TextRecipe | None = None,
    ) -> TextEncoder:
        """``max_length`` None: the recipe's."""
        transformers = importlib.import_module("transformers")
        model = pretrained_model(folder, TEXT_ENCODER_CLASS, dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer_folder or folder))
        recipe = recipe or TextRecipe("last_hidden_state")
        return cls(
            model.to(device), tokenizer, recipe.max_length if max_length is None else max_length, recipe
        )

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor | None:
        """``[L, E]`` float32: the recipe's hidden states of the text's valid tokens (EOS included,
        no padding, the template's leading tokens cropped); None when the recipe's ``select``
        picks nothing of the text."""
        recipe = self.recipe
        picked = text if recipe.select is None else recipe.select(text)
        if picked is None:
            return None
        lengths = {
            "truncation": True,
            "max_length": self.max_length + recipe.crop_start,
            "padding": "max_length" if recipe.pad else False,
            "return_tensors": "pt",
        }
        if recipe.chat_system is None:
            tokens = self.tokenizer(recipe.template.format(picked), **lengths)
        else:
            chat = [
                {"role": "system", "content": recipe.chat_system},
                {"role": "user", "content": picked or " "},
            ]
            tokens = self.tokenizer.apply_chat_template(
                [chat], add_generation_prompt=True, tokenize=True, return_dict=True, **lengths
            )
        device = next(self.model.parameters()).device
        mask = tokens["attention_mask"].to(device)
        output = self.model(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=mask,
            output_hidden_states=recipe.hidden_state is not None,
        )
        hidden = (
            output.last_hidden_state
            if recipe.hidden_state is None
            else output.hidden_states[recipe.hidden_state]
        )
        valid = mask[0, recipe.crop_start :].bool()
        return hidden[0, recipe.crop_start :][valid].float().cpu()

    @torch.no_grad()
    def pool(self, text: str) -> torch.Tensor:
        """``[E]`` float32: the model's ``pooler_output`` (CLIP: the final-normed EOS state), as diffusers'
        HunyuanVideo pipelines' ``_get_clip_prompt_embeds`` runs it: padded to ``max_length``,
        truncated, without an attention mask (CLIP's causal mask keeps padding out of the EOS state)."""
        tokens = self.tokenizer(
            text, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        output = self.model(tokens["input_ids"].to(device), output_hidden_states=False)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise ValueError(f"{self.name} gives no pooler_output, the pooled text HunyuanVideo reads")
        return pooled[0].float().cpu()


# Wan 2.1 I2V's: diffusers' ``WanImageToVideoPipeline.encode_image`` takes CLIP's penultimate layer
# (``image_encoder(**image, output_hidden_states=True).hidden_states[-2]``).
CLIP_PENULTIMATE = ImageEncoding("CLIPImageProcessor", -2)


class ImageEncoder:
    """A transformers vision model and its image processor: an image -> tokens ``[L, E]``, the
    hidden state an :class:`ImageEncoding` names (default :data:`CLIP_PENULTIMATE`; a family's
    ``ModelFamily.image_encoding``, such as HunyuanVideo 1.5's SigLIP ``last_hidden_state``)."""

    def __init__(self, model: Any, processor: Any, encoding: ImageEncoding = CLIP_PENULTIMATE) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.encoding = encoding

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        processor_folder: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        encoding: ImageEncoding = CLIP_PENULTIMATE,
    ) -> ImageEncoder:
        transformers = importlib.import_module("transformers")
        model = pretrained_model(folder, IMAGE_ENCODER_CLASS, dtype)
        processor_class = getattr(transformers, encoding.processor)
        processor = processor_class.from_pretrained(os.fspath(processor_folder or folder))
        return cls(model.to(device), processor, encoding)

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[L, E]`` float32 tokens of an image ``[3, 1, H, W]`` in [-1, 1]."""
        # The pipeline hands the processor an 8-bit RGB image: [H, W, 3] uint8, resized and normalised there.
        image = ((pixels[:, 0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        values = self.processor(images=image.numpy(), return_tensors="pt")["pixel_values"]
        parameter = next(self.model.parameters())
        hidden_state = self.encoding.hidden_state
        output = self.model(
            pixel_values=values.to(parameter.device, parameter.dtype),
            output_hidden_states=hidden_state is not None,
        )
        tokens = output.last_hidden_state if hidden_state is None else output.hidden_states[hidden_state]
        return tokens[0].float().cpu()


@dataclass
class Encoders:
    """The models a run encodes with, and the folders they came from (for OUT/encode.json)."""

    vae: VideoVAE
    # per-token embeddings [L, E]; an ImageTextEncoder also sees an image (the recipe's ``image``)
    text: TextEncoder | ImageTextEncoder | None = None
    pooled: TextEncoder | None = None  # one pooled vector [E] (HunyuanVideo: CLIP-L's)
    folders: dict[str, str | None] = field(default_factory=dict)
    image: ImageEncoder | None = None  # the condition image's tokens [L, E] (Wan 2.1 I2V: CLIP ViT-H's)
    i2v_condition: bool = False  # each target's Wan I2V condition latent (VideoVAE.i2v_condition)
    # A second text encoder's rows [L2, E2] (HunyuanVideo 1.5: ByT5 on the glyph text)
    text_2: TextEncoder | None = None

    def __post_init__(self) -> None:
        if self.i2v_condition and not VAES[self.vae.class_name].i2v_condition:
            takes = ", ".join(name for name, vae in VAES.items() if vae.i2v_condition)
            raise ValueError(
                f"--i2v-condition writes the image-to-video condition latents of the families that encode with "
                f"{takes}, not {self.vae.class_name}: its family's condition (the condition image's latent) is "
                "built by the loader"
            )

    @classmethod
    def load(
        cls,
        vae: str,
        text: str | None = None,
        tokenizer: str | None = None,
        pooled: str | None = None,
        pooled_tokenizer: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        sample_posterior: bool = False,
        tiling: bool = False,
        max_text_length: int | None = None,
        max_pooled_length: int = 77,
        image: str | None = None,
        image_processor: str | None = None,
        i2v_condition: bool = False,
        text_recipe: str = "last_hidden_state",
        text_2: str | None = None,
        tokenizer_2: str | None = None,
        text_image_processor: str | None = None,
        text_images: str = "first",
    ) -> Encoders:
        """``max_text_length`` None: the text recipe's (:meth:`TextRecipe.named`). ``text_recipe`` a
        family's name also says how its second text encoder (``text_2``) and its image encoder are
        read (``ModelFamily.text_encoding_2``, ``image_encoding``). A recipe whose text encoder also
        sees an image (HunyuanVideo-I2V's) reads it through ``text_image_processor`` (default: the
        text encoder's folder); ``text_images`` says which (:mod:`imontage.dataprep.image_text`)."""
        folders = {"vae": vae, "text_encoder": text, "tokenizer": tokenizer or text,
                   "pooled_text_encoder": pooled, "pooled_tokenizer": pooled_tokenizer or pooled}  # fmt: skip
        if image is not None:  # only then: the manifests of folders encoded before stay valid
            folders.update(image_encoder=image, image_processor=image_processor or image)
        if text_2 is not None:
            folders.update(text_encoder_2=text_2, tokenizer_2=tokenizer_2 or text_2)
        recipe = TextRecipe.named(text_recipe, images=text_images)
        text_length = recipe.max_length if max_text_length is None else max_text_length
        if recipe.image is not None and text is not None:  # only then: earlier manifests stay valid
            folders.update(text_image_processor=text_image_processor or text)
        if text is None and recipe.name != "last_hidden_state":
            raise ValueError(f"text recipe '{recipe.name}' needs a text encoder (--text-encoder)")
        recipe_2 = None if text_2 is None else TextRecipe.named(text_recipe, second=True)
        family = FAMILIES.get(text_recipe)
        image_encoding = (
            family.image_encoding() if family is not None and family.image_encoding else CLIP_PENULTIMATE
        )
        pooled_encoder = (
            None
            if pooled is None
            else TextEncoder.load(pooled, pooled_tokenizer, device, dtype, max_pooled_length)
        )
        if pooled_encoder is not None and pooled_encoder.name.endswith("WithProjection"):
            raise ValueError(
                f"{pooled}: a {pooled_encoder.name} gives text_embeds (projected); HunyuanVideo's pooled text is "
                "CLIPTextModel's pooler_output, as diffusers' pipelines read text_encoder_2: load it as CLIPTextModel"
            )
        return cls(
            VideoVAE.load(vae, device, dtype, sample_posterior, tiling),
            None
            if text is None
            else TextEncoder.load(text, tokenizer, device, dtype, max_text_length, recipe)
            if recipe.image is None
            else ImageTextEncoder.load(
                text, tokenizer, text_image_processor, device, dtype, text_length, recipe, pretrained_model
            ),
            pooled_encoder,
            {name: None if path is None else os.path.abspath(path) for name, path in folders.items()},
            None
            if image is None
            else ImageEncoder.load(image, image_processor, device, dtype, image_encoding),
            i2v_condition,
            None
            if text_2 is None or recipe_2 is None
            else TextEncoder.load(text_2, tokenizer_2, device, dtype, None, recipe_2),
        )

    def manifest(self, settings: EncodeSettings) -> dict[str, Any]:
        vae = self.vae
        texts = {
            name: None if encoder is None else {"model": encoder.name, "max_length": encoder.max_length}
            for name, encoder in (("text_encoder", self.text), ("pooled_text_encoder", self.pooled))
        }
        # Written only when used, so that the manifests of folders encoded before stay valid.
        if self.text is not None and self.text.recipe.name != "last_hidden_state":
            texts["text_encoder"] = {**(texts["text_encoder"] or {}), "recipe": self.text.recipe.to_json()}
        if self.text_2 is not None:
            texts["text_encoder_2"] = {"model": self.text_2.name, "max_length": self.text_2.max_length,
                                       "recipe": self.text_2.recipe.to_json()}  # fmt: skip
        if self.image is not None:
            hidden = self.image.encoding.hidden_state
            tokens = "last_hidden_state" if hidden is None else f"hidden_states[{hidden}]"
            image: dict[str, Any] = {"model": self.image.name, "tokens": tokens}
            if self.image.encoding != CLIP_PENULTIMATE:  # only then: earlier manifests stay valid
                image["processor"] = self.image.encoding.processor
            texts["image_encoder"] = image
        if self.i2v_condition:
            texts["i2v_condition"] = {"posterior": "mode", "frames": "image + zero frames"}
        return {
            "vae": {"class": vae.class_name, "dtype": str(vae.dtype), "normalization": vae.norm.to_json(),
                    "posterior": "sample" if vae.sample_posterior else "mode", "tiling": vae.tiling,
                    "temporal": vae.temporal, "spatial": vae.spatial, "channels": vae.channels},
            **texts,
            "folders": self.folders,
            "settings": settings.to_json(),
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# one sample


@dataclass
class EncodeSettings:
    options: DecodeOptions = field(default_factory=lambda: DecodeOptions(max_frames=1 << 30))
    latent_dtype: str = "float32"  # stored dtype of latents and text embeddings (float32, float16)
    seed: int = 0  # posterior sampling, per sample: seeded by (seed, key)
    # Also encode this text as the folder's negative prompt, OUT/negative.safetensors (None: none).
    negative_prompt: str | None = None
    # (pt, ph, pw) of the model the latents are for: a latent that does not divide into them is left
    # out (unpackable), as training would skip it. Every shipped latent preset patchifies by (1, 2, 2).
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    # Target clips' frames also encoded alone, stored beside their latent (imontage.dataprep.keyframes).
    keyframes: KeyframeSelection = field(default_factory=KeyframeSelection)

    def to_json(self) -> dict[str, Any]:
        # keyframes: a training setting (which stored keyframes condition a clip); encoding reads none
        options = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(self.options).items()
            if k != "keyframes"
        }
        out = {"options": options, "latent_dtype": self.latent_dtype, "seed": self.seed}
        # Only when set: the manifests of folders encoded before stay valid.
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        if tuple(self.patch_size) != DEFAULT_PATCH_SIZE:
            out["patch_size"] = list(self.patch_size)
        if self.keyframes.active:
            out["keyframes"] = self.keyframes.to_json()
        return out


def _safetensors(
    raw: RawSample, member: str, name: str, tensor: torch.Tensor, dtype: str, metadata: dict[str, str]
) -> bytes:
    """``tensor`` as the bytes of ``member`` (its tensor ``name``, stored as ``dtype``); a
    ``non_finite`` :class:`DataError` when it holds NaN or Inf as stored (a model that overflowed,
    or float16 that could not hold a value), which training would never read."""
    from safetensors.torch import save

    stored = tensor.to(LATENT_DTYPES[dtype]).contiguous()
    bad = int((~torch.isfinite(stored)).sum())
    if bad:
        detail = f"member '{member}': tensor '{name}' {list(stored.shape)} holds {bad:,} NaN or infinite values as {dtype}"
        raise DataError.of("non_finite", raw.url, raw.key, detail)
    return save({name: stored}, metadata=metadata)


def _check_patches(
    raw: RawSample, index: int, member: str, shape: Sequence[int], patch_size: Sequence[int]
) -> None:
    """Segment ``index``'s latent ``[C, T', H', W']`` must divide into the model's patches."""
    try:
        patch_grid(shape, patch_size)
    except ValueError:
        detail = (
            f"segment {index}, member '{member}': its latent {list(shape)} does not divide into the model's "
            f"patches {tuple(patch_size)} (--patch-size), so no model could train on it"
        )
        raise DataError.of("unpackable", raw.url, raw.key, detail) from None


def _generator(settings: EncodeSettings, key: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{settings.seed}/{key}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little"))


def _visual_tensors(raw: RawSample, record: SampleRecord, settings: EncodeSettings) -> list[torch.Tensor]:
    """Each record segment's decoded tensor, in record order (pixels ``[3, T, H, W]`` or stored latents)."""
    item = decode_item(raw, settings.options)
    tensors: dict[int, torch.Tensor] = {}
    for sample, group in zip(item.samples, record.groups, strict=True):
        visual = [segment for segment in sample.segments if segment.kind != "text"]
        indices = [i for i, entry in enumerate(record.segments) if entry.group in (None, group)]
        for index, segment in zip(indices, visual, strict=True):
            assert segment.data is not None
            tensors.setdefault(index, segment.data)
    return [tensors[i] for i in range(len(record.segments))]


def encode_sample(raw: RawSample, encoders: Encoders, settings: EncodeSettings) -> dict[str, bytes]:
    """The members of the latent sample of ``raw``; a :class:`DataError` when it cannot be read."""
    vae, text = encoders.vae, encoders.text
    record = parse_record(raw)
    source = json.loads(raw.members["json"].decode("utf-8"))
    # Members carried over as they are must load, finite, as training will read them.
    own = (
        (record.text_embedding, text),
        (record.pooled_text, encoders.pooled),
        (record.image_embeds, encoders.image),
        (record.text_embedding_2, encoders.text_2),
    )
    conditions = [member for segment in record.segments for member in (segment.condition_latent, segment.keyframes)
                  if member]  # fmt: skip
    check_array_members(raw, [member for member, encoder in own if member and encoder is None] + conditions)
    generator = _generator(settings, raw.key, vae.device) if vae.sample_posterior else None
    members: dict[str, bytes] = {}
    segments: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    norm_meta = {"vae": vae.class_name, "norm": json.dumps(vae.norm.to_json())}
    fitted: dict[int, torch.Tensor] = {}  # segment index -> the pixels [3, T, H, W] encoded
    for index, (entry, data) in enumerate(
        zip(record.segments, _visual_tensors(raw, record, settings), strict=True)
    ):
        out: dict[str, Any] = {"role": entry.role, "kind": "latent", "tensor": LATENT_TENSOR}
        if entry.group is not None:
            out["group"] = entry.group
        if entry.kind == "latent":  # already a latent: kept as stored (its normalisation is its own)
            _check_patches(raw, index, entry.members[0], data.shape, settings.patch_size)
            out["member"] = latent_member(index)
            members[out["member"]] = _safetensors(
                raw, out["member"], LATENT_TENSOR, data, settings.latent_dtype, {}
            )
            if entry.anchor is not None:
                out["anchor"] = entry.anchor
            if entry.condition_latent is not None:  # travels along, like the latent it lies over
                out["condition_latent"] = condition_member(index, extension(entry.condition_latent))
                members[out["condition_latent"]] = raw.members[entry.condition_latent]
            if entry.keyframes is not None:  # so do its keyframes
                fields, own_keyframes = carry_keyframes(raw, index, entry.keyframes, entry.keyframe_frames)
                out.update(fields)
                members.update(own_keyframes)
            shapes.append({"kind": "latent", "pixels": None})
        else:
            try:
                pixels = vae.fit(data)
            except ValueError as error:
                raise DataError.of("unpackable", raw.url, raw.key, f"segment {index}: {error}") from None
            _check_patches(raw, index, entry.members[0], vae.latent_shape(pixels.shape), settings.patch_size)
            latent = vae.encode(pixels, generator)  # [C, T', H', W']
            out["member"] = latent_member(index)
            members[out["member"]] = _safetensors(
                raw, out["member"], LATENT_TENSOR, latent.cpu(), settings.latent_dtype, norm_meta
            )
            if entry.anchor is not None:  # pixel frame f lies in latent frame ceil(f / temporal)
                out["anchor"] = -(-entry.anchor // vae.temporal)
            shapes.append({"kind": entry.kind, "pixels": list(pixels.shape)})
            fitted[index] = pixels
        segments.append(out)
    if settings.keyframes.active:
        members.update(encode_keyframes(
            record, settings.keyframes, lambda pixels: vae.encode(pixels, mode=True), vae.temporal, fitted,
            segments, shapes,
            lambda member, name, tensor: _safetensors(raw, member, name, tensor, settings.latent_dtype, norm_meta),
        ))  # fmt: skip
    image_tokens = 0
    if encoders.image is not None or encoders.i2v_condition:
        image_tokens = _encode_image_condition(raw, record, encoders, settings, fitted, segments, members)
    result = {k: v for k, v in source.items() if k not in ("segments", *ARRAY_FIELDS)}
    result["segments"] = segments
    result["latent"] = {
        "vae": vae.class_name,
        "normalization": vae.norm.to_json(),
        "posterior": "sample" if vae.sample_posterior else "mode",
        "segments": shapes,
    }
    if text is not None:
        embedding: torch.Tensor | None
        if isinstance(text, ImageTextEncoder):  # [image rows + text rows, E]
            embedding = text.encode(record.text, text_image(raw, record, fitted, text.recipe.images))
        else:
            embedding = text.encode(record.text)  # [L, E]
        assert embedding is not None  # a first text encoder's recipe selects the whole text
        members[TEXT_MEMBER] = _safetensors(
            raw, TEXT_MEMBER, TEXT_TENSOR, embedding, settings.latent_dtype, {}
        )
        result["text_embedding"] = TEXT_MEMBER
        result["text_encoder"] = {
            "model": text.name,
            "tokens": int(embedding.shape[0]),
            "max_length": text.max_length,
        }
        if text.recipe.name != "last_hidden_state":
            result["text_encoder"]["recipe"] = text.recipe.name
        if isinstance(text, ImageTextEncoder):  # which image it saw: the first condition one, or black
            result["text_encoder"]["image"] = text.recipe.images
    elif record.text_embedding is not None:  # no encoder given: the precomputed one travels along
        name = f"text.{extension(record.text_embedding)}"
        members[name] = raw.members[record.text_embedding]
        result["text_embedding"] = name
    if encoders.text_2 is not None:
        _encode_text_2(raw, record.text, encoders.text_2, settings, result, members)
    carried = (
        ("pooled_text", record.pooled_text, encoders.pooled),
        ("image_embeds", record.image_embeds, encoders.image),
        ("text_embedding_2", record.text_embedding_2, encoders.text_2),
    )
    for name, member, encoder in carried:
        if member is not None and encoder is None:  # no encoder given: the input's own member travels along
            result[name] = f"{name}.{extension(member)}"
            members[result[name]] = raw.members[member]
    if encoders.image is not None:
        result["image_embeds"] = IMAGE_MEMBER
        result["image_encoder"] = {"model": encoders.image.name, "tokens": image_tokens}
    if encoders.pooled is not None:
        pooled = encoders.pooled.pool(record.text)  # [E]
        members[POOLED_MEMBER] = _safetensors(
            raw, POOLED_MEMBER, POOLED_TENSOR, pooled, settings.latent_dtype, {}
        )
        result["pooled_text"] = POOLED_MEMBER
        result["pooled_text_encoder"] = {
            "model": encoders.pooled.name,
            "max_length": encoders.pooled.max_length,
        }
    members["json"] = json.dumps(result, sort_keys=True).encode("utf-8")
    return members


def _encode_text_2(
    raw: RawSample,
    text: str,
    encoder: TextEncoder,
    settings: EncodeSettings,
    result: dict[str, Any],
    members: dict[str, bytes],
) -> None:
    """The second text encoder's rows of ``text`` (``text_embedding_2``, into ``result`` and
    ``members``); nothing stored when its recipe selects nothing of the text (HunyuanVideo 1.5: a
    prompt without quoted glyph text), but the encoder is recorded with 0 tokens."""
    embedding = encoder.encode(text)  # [L2, E2] or None
    result["text_encoder_2"] = {"model": encoder.name, "tokens": 0 if embedding is None else int(embedding.shape[0]),
                                "max_length": encoder.max_length, "recipe": encoder.recipe.name}  # fmt: skip
    if embedding is not None:
        members[TEXT_2_MEMBER] = _safetensors(
            raw, TEXT_2_MEMBER, TEXT_TENSOR, embedding, settings.latent_dtype, {}
        )
        result["text_embedding_2"] = TEXT_2_MEMBER


def _encode_image_condition(
    raw: RawSample,
    record: SampleRecord,
    encoders: Encoders,
    settings: EncodeSettings,
    fitted: dict[int, torch.Tensor],
    segments: list[dict[str, Any]],
    members: dict[str, bytes],
) -> int:
    """The condition image's encoder tokens (``image_embeds``) and each target's Wan I2V condition
    latent (``condition_latent``), into ``members`` and ``segments``; returns the token count (0
    without an image encoder). The condition image is the sample's first condition segment, an
    image; a sample without one is left out (``unpackable``)."""
    image = next((i for i, entry in enumerate(record.segments) if entry.role == "condition"), None)
    pixels = fitted.get(image) if image is not None else None
    if image is None or pixels is None or pixels.shape[1] != 1:
        what = "no condition segment" if image is None else f"segment {image}, not an image in pixels"
        raise DataError.of(
            "unpackable", raw.url, raw.key, f"image-to-video encoding needs a condition image: {what}"
        )
    if encoders.image is not None:
        tokens = encoders.image.encode(pixels)  # [L, E]
        members[IMAGE_MEMBER] = _safetensors(
            raw, IMAGE_MEMBER, IMAGE_TENSOR, tokens, settings.latent_dtype, {}
        )
    count = 0 if encoders.image is None else int(tokens.shape[0])
    if not encoders.i2v_condition:
        return count
    norm_meta = {"vae": encoders.vae.class_name, "norm": json.dumps(encoders.vae.norm.to_json())}
    for index, (entry, out) in enumerate(zip(record.segments, segments, strict=True)):
        if entry.role != "target" or "condition_latent" in out:
            continue
        target = fitted.get(index)
        if target is None or target.shape[2:] != pixels.shape[2:]:
            size = "a stored latent" if target is None else f"{target.shape[2]}x{target.shape[3]} pixels"
            raise DataError.of(
                "unpackable", raw.url, raw.key,
                f"segment {index}: the I2V condition lays the condition image (segment {image}, "
                f"{pixels.shape[2]}x{pixels.shape[3]}) over the target's first frame, and the target is {size}",
            )  # fmt: skip
        latent = encoders.vae.i2v_condition(pixels, target.shape[1])  # [C, T', H', W']
        out["condition_latent"] = condition_member(index)
        members[out["condition_latent"]] = _safetensors(
            raw, out["condition_latent"], CONDITION_TENSOR, latent.cpu(), settings.latent_dtype, norm_meta
        )
    return count


# ---------------------------------------------------------------------------------------------
# shards


@dataclass
class ShardReport:
    url: str
    out: str
    skipped: bool = False  # already complete: left untouched
    samples: int = 0  # samples written (or found, when skipped)
    problems: Counter = field(default_factory=Counter)  # reason -> samples left out (and shard problems)


def output_path(url: str, out: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(out), os.path.basename(url))


def encode_shard(
    url: str,
    out: str | os.PathLike[str],
    encoders: Encoders,
    settings: EncodeSettings,
    progress: tqdm | None = None,
) -> ShardReport:
    """Encode one input shard into ``OUT/<its file name>``, unless that is there already.

    The shard is written as ``.partial`` and renamed into place when complete (a leftover
    ``.partial`` of a killed run is overwritten); its index follows, so the loader need not scan
    it. Samples the reader rejects are left out, counted by reason, and logged.
    """
    os.makedirs(out, exist_ok=True)
    path = output_path(url, out)
    report = ShardReport(url, path)
    if os.path.exists(path):
        index = read_sidecar(path)
        if index is None:  # killed between the rename and the index
            index = scan_shard(path)
            write_index(index)
        report.skipped, report.samples = True, len(index)
        if progress is not None:
            progress.update(len(read_sidecar(url) or index))
        return report
    with ShardWriter(path) as writer:
        try:
            for raw in read_shard(url):
                if progress is not None:
                    progress.update(1)
                if raw.duplicate:
                    report.problems["duplicate_key"] += 1
                    continue
                try:
                    members = encode_sample(raw, encoders, settings)
                except DataError as error:
                    log.warning("left out: %s", error)
                    report.problems[error.reason] += 1
                    continue
                writer.add_sample(raw.key, members)
        except ShardProblem as problem:  # the samples before it are kept, as the loader keeps them
            log.warning("%s: %s", url, problem)
            report.problems[problem.reason] += 1
        report.samples = writer.samples
    write_index(scan_shard(path))
    return report


def check_manifest(out: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Write ``OUT/encode.json``, or check that the shards already there were made the same way."""
    path = Path(out) / MANIFEST
    if path.exists():
        existing = untrusted.read_json(path, dict)
        if existing != manifest:
            differ = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
            raise ValueError(
                f"{path}: the shards in {out} were encoded with other {', '.join(differ)}; "
                "use another --out folder or remove it"
            )
        return
    partial = path.with_name(f"{MANIFEST}.partial.{os.getpid()}")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def write_negative(out: str | os.PathLike[str], encoders: Encoders, settings: EncodeSettings) -> Path:
    """``OUT/negative.safetensors``: ``settings.negative_prompt`` through the text encoder (tensor
    ``text_embedding``) and the pooled one (``pooled_text``), like every sample's text: what
    ``imontage-sample --negative`` reads for true classifier-free guidance (diffusers' HunyuanVideo
    pipelines encode their ``negative_prompt`` through both encoders), and the second text encoder's
    rows (``text_embedding_2``) when it has any. Written once, atomically."""
    path = Path(out) / NEGATIVE
    if encoders.text is None or settings.negative_prompt is None:
        raise ValueError("a negative prompt needs a text encoder (--text-encoder)")
    if path.exists():  # the manifest check guarantees the same prompt and encoders
        return path
    from safetensors.torch import save_file

    embedding: torch.Tensor | None
    if isinstance(encoders.text, ImageTextEncoder):  # with a black image, as the pipeline encodes it
        embedding = encoders.text.encode(settings.negative_prompt, None)
    else:
        embedding = encoders.text.encode(settings.negative_prompt)
    assert embedding is not None  # a first text encoder's recipe selects the whole text
    tensors = {TEXT_TENSOR: embedding}
    if encoders.pooled is not None:
        tensors[POOLED_TENSOR] = encoders.pooled.pool(settings.negative_prompt)
    second = None if encoders.text_2 is None else encoders.text_2.encode(settings.negative_prompt)
    if second is not None:  # a negative prompt with glyph text
        tensors[TEXT_2_TENSOR] = second
    dtype = LATENT_DTYPES[settings.latent_dtype]
    partial = path.with_name(f"{NEGATIVE}.partial.{os.getpid()}")
    save_file(
        {k: v.to(dtype).contiguous() for k, v in tensors.items()},
        partial,
        metadata={"prompt": settings.negative_prompt},
    )
    os.replace(partial, path)
    return path


def rank_shards(urls: Sequence[str], rank: int, world: int) -> list[str]:
    """The input shards rank ``rank`` of ``world`` encodes: every ``world``-th, from the ``rank``-th."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    names = [os.path.basename(url) for url in urls]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"input shards share file names {repeated}: their outputs would collide")
    return list(urls[rank::world])


def encode_shards(
    spec: str,
    out: str | os.PathLike[str],
    encoders: Encoders,
    rank: int = 0,
    world: int = 1,
    settings: EncodeSettings | None = None,
    progress: bool = True,
) -> list[ShardReport]:
    """Encode this rank's share of the shards of ``spec`` into ``out`` (see the module doc)."""
    settings = settings or EncodeSettings()
    urls = rank_shards(expand_shards(spec), rank, world)
    os.makedirs(out, exist_ok=True)
    check_manifest(out, encoders.manifest(settings))
    if settings.negative_prompt is not None:
        write_negative(out, encoders, settings)
    indexes = [read_sidecar(url) for url in urls]
    total = sum(len(index) for index in indexes if index) if all(indexes) else None
    reports = []
    with tqdm(
        total=total, desc=f"encoding (rank {rank}/{world})", unit="sample", disable=not progress
    ) as bar:
        for url in urls:
            report = encode_shard(url, out, encoders, settings, bar)
            bar.set_postfix_str(f"{os.path.basename(url)} {'skipped' if report.skipped else 'done'}")
            reports.append(report)
    return reports


# ---------------------------------------------------------------------------------------------
# decoding latent samples back to pixels


def decode_latent_sample(raw: RawSample, vae: VideoVAE) -> list[torch.Tensor | None]:
    """Pixels ``[3, T, H, W]`` of each latent segment of an encoded sample (None for one stored
    as a latent in the input), undoing the normalisation its json records."""
    record = parse_record(raw)
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))["latent"]
        encoded_by, norm = meta["vae"], LatentNorm.from_json(meta["normalization"])
        encoded = [shape["pixels"] is not None for shape in meta["segments"]]
        if len(encoded) != len(record.segments):
            raise ValueError(f"{len(encoded)} segments in 'latent', {len(record.segments)} in 'segments'")
    except (KeyError, TypeError, ValueError) as error:
        detail = f"member 'json' holds no 'latent' record of tools/encode_shards.py ({error!r})"
        raise DataError.of("bad_json", raw.url, raw.key, detail) from None
    if encoded_by != vae.class_name:
        raise ValueError(f"sample '{raw.key}' was encoded by {encoded_by}, not {vae.class_name}")
    pixels: list[torch.Tensor | None] = []
    for segment, was_encoded in zip(record.segments, encoded, strict=True):
        if not was_encoded:
            pixels.append(None)
            continue
        member = segment.members[0]
        try:
            stored = media.load_array(raw.members[member], extension(member), segment.tensor)
        except media.MediaError as error:
            raise DataError.of(error.reason, raw.url, raw.key, f"member '{member}': {error}") from None
        pixels.append(vae.decode(torch.from_numpy(np.ascontiguousarray(stored)), norm))
    return pixels

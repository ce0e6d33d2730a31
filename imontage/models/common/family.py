"""The record a model family registers: everything the rest of imontage asks of a family.

A family is one folder under ``imontage/models/`` (the own DiT, Wan 2.1, HunyuanVideo, ...) whose
``family.py`` exports one :class:`ModelFamily`; :mod:`imontage.models.registry` lists them. The
trainer, the recipe schema and validation, parallelization, diffusers import and export, sampling,
Imagic and the latent encoder look a family up there by ``model.family`` (or by the built module)
and never branch on its name: adding a family is its folder and one registration line.

Records are light to import: what needs the family's model code (building it, its module class)
is a function that imports it when called, so a DiT run never imports the pretrained families.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

from imontage.models.common.cost import FamilyCost
from imontage.models.common.parallel_plan import FamilyPlan


@dataclass(frozen=True)
class ModelInputs:
    """What a model reads besides tokens, as the data must supply it (``PackingSpec`` fields).

    ``channel_condition``: the condition laid over each target segment as extra channels (one of
    :data:`imontage.models.common.sequence.CHANNEL_CONDITIONS`); ``guidance_embedding``: whether
    the model takes a distilled-guidance scale per sample.
    """

    pooled_text_dim: int = 0
    image_embed_dim: int = 0
    text_embed_2_dim: int = 0  # width of its second text encoder's rows (text segments of encoder 1)
    channel_condition: str = ""
    guidance_embedding: bool = False
    # Its channel condition with keyframes at any latent frames: (latents [C, T, H, W], zeros on frames
    # not given; given [T] bool) -> [C', T, H, W], as its image-to-video pipeline lays an image and mask.
    keyframe_condition: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class Expert:
    """One network of a model whose networks split the timesteps between them (Wan 2.2 A14B's pair).

    ``name`` is its component in the family's diffusers pipeline folder (its subfolder there); it
    denoises the timesteps ``t`` (1 = pure noise) in ``[t_min, t_max)``, the top one ``t_max = 1``
    included.
    """

    name: str
    t_min: float
    t_max: float


@dataclass(frozen=True)
class SamplingDefaults:
    """How ``imontage-sample`` samples a family unless told otherwise."""

    guidance: float = 3.0  # classifier-free guidance scale
    # The unconditional pass must be named (--negative): the family was pretrained with a
    # negative prompt rather than with text dropout.
    negative_required: bool = False


@dataclass(frozen=True)
class TextEncoding:
    """How ``encode_shards.py --text-recipe <family>`` turns a prompt into what the family's
    pipeline feeds its transformer (a template around the prompt, the hidden state taken, the
    template's tokens cropped, the length padded to)."""

    template: str
    crop_start: int
    hidden_state: int | None  # index into the encoder's hidden states (None: last_hidden_state)
    max_length: int
    pad: bool = True
    # The prompt is the user turn of a chat with this system message, through the tokenizer's chat
    # template with the assistant's turn opened (None: ``template.format(prompt)``).
    chat_system: str | None = None
    # What of the prompt is encoded (None: all of it); it gives None when there is nothing to
    # encode, and then no rows are stored (HunyuanVideo 1.5's glyph text: the quoted strings).
    select: Callable[[str], str | None] | None = None
    # The encoder also sees one image, as tokens in the template (None: text only).
    image: ImageInText | None = None


@dataclass(frozen=True)
class ImageInText:
    """How a text encoder that also sees an image (a LLaVA, HunyuanVideo-I2V's) reads it and what of
    its output is kept: the template's one image placeholder token at ``start`` (in the tokenised
    template) becomes ``tokens`` image-token positions; the rows at those positions are kept, every
    ``interleave``-th, ahead of the text's rows; of the text, the ``cut`` tokens before the position
    after the last ``marker`` token (the assistant turn's header) are dropped. ``processor`` is the
    transformers image processor class that turns the image into the model's pixel values."""

    processor: str
    tokens: int
    start: int
    interleave: int
    marker: str
    cut: int


@dataclass(frozen=True)
class ImageEncoding:
    """How ``encode_shards.py --image-encoder`` turns the condition image into the family's image
    tokens ``[L, E]``: the transformers image processor class its pipeline loads, and the hidden
    state it takes (None: ``last_hidden_state``)."""

    processor: str
    hidden_state: int | None


@dataclass(frozen=True)
class LatentFormat:
    """What a diffusers VAE config says of its latents: channels, temporal and spatial compression,
    and the normalisation the family's pipelines apply (``(z - shift) * scale`` per channel)."""

    channels: int
    temporal: int
    spatial: int
    shift: tuple[float, ...]
    scale: tuple[float, ...]


def scaled_latents(config: Any) -> LatentFormat:
    """The usual diffusers video VAE config: ``*_compression_ratio`` keys, latents times
    ``scaling_factor`` (HunyuanVideo's and HunyuanVideo 1.5's VAEs)."""
    channels = int(config.latent_channels)
    return LatentFormat(
        channels,
        int(config.temporal_compression_ratio),
        int(config.spatial_compression_ratio),
        (0.0,) * channels,
        (float(config.scaling_factor),) * channels,
    )


@dataclass(frozen=True)
class VaeSpec:
    """A diffusers video VAE class the family's pipelines encode with (``encode_shards.py --vae``)."""

    class_name: str
    latents: Callable[[Any], LatentFormat] = scaled_latents  # from the VAE's config; ValueError if unfit
    # Causal frame by frame with a feature cache: decoding a video in pieces gives the whole decode's
    # pixels (long videos stream through it: imontage-sample --sar).
    streams: bool = False
    # encode_shards.py --i2v-condition writes the family's image-to-video condition latents with it.
    i2v_condition: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """One model family (module docstring). Keys named here are of the recipe's ``model`` section."""

    name: str  # model.family
    summary: str  # what it is, in a line
    build: Callable[[Any, Any], nn.Module]  # (model config, device) -> the single-device model
    model_class: str  # the class build returns, "package.module.ClassName" (not imported to name it)
    parallel_plan: FamilyPlan  # its tensor-parallel cuts and sequence plan, block list by block list
    # Keys of its own section ``model.<name>`` (a dataclass), None when it has none.
    config_section: type | None = None
    # What it reads besides tokens, from a model config; ValueError names a key it cannot build.
    model_inputs: Callable[[Any], ModelInputs] = field(default=lambda cfg: ModelInputs())
    # Channels of the visual segments it takes (the latent's; I2V's extra ones are channel conditions).
    latent_channels: Callable[[Any], int] = field(default=lambda cfg: int(cfg.in_channels))
    # Whether each target video's first latent frame stays clean (HunyuanVideo-I2V token_replace).
    clean_first_frame: Callable[[Any], bool] = field(default=lambda cfg: False)
    # (key, reason) for each family-specific value a recipe may not set.
    validate: Callable[[Any], list[tuple[str, str]]] = field(default=lambda cfg: [])
    precomputed_text: bool = False  # reads text embeddings, not the built-in byte encoder
    predictions: tuple[str, ...] = ("velocity", "data")  # what model.prediction may be
    # diffusers' class name(s) of its transformer -> the module mapping config.json to a model
    # config and back (``model_config_from_diffusers``, ``diffusers_config``), imported when asked.
    diffusers_classes: tuple[str, ...] = ()
    diffusers_config: Callable[[], ModuleType] | None = None
    sampling: SamplingDefaults = SamplingDefaults()
    text_encoding: Callable[[], TextEncoding] | None = None  # encode_shards.py --text-recipe <name>
    # Its other pipelines' text recipes, by recipe name (--text-recipe <recipe>; HunyuanVideo-I2V's).
    other_text_encodings: tuple[tuple[str, Callable[[], TextEncoding]], ...] = ()
    # Its second text encoder's, whose rows are text segments of encoder 1 (--text-encoder-2).
    text_encoding_2: Callable[[], TextEncoding] | None = None
    # Its image encoder's, under --text-recipe <name> (None: CLIP's penultimate layer, Wan 2.1 I2V's).
    image_encoding: Callable[[], ImageEncoding] | None = None
    # ZeRO-3 keeps parameters of fewer elements than this resident on every rank (0: none).
    zero3_resident_below: Callable[[nn.Module], int] = field(default=lambda module: 0)
    # Width of the text features Imagic optimises (None: the family has no single text path to edit).
    imagic_text_width: Callable[[nn.Module], int] | None = None
    # Its memory and communication model for tools/plan.py (None: the plan refuses the family).
    cost: FamilyCost | None = None
    # The experts of a model config, highest timesteps first (() for a model of one network);
    # ``model.expert`` picks one of them to train alone.
    experts: Callable[[Any], tuple[Expert, ...]] = field(default=lambda cfg: ())
    # The VAEs its pipelines encode with.
    vaes: tuple[VaeSpec, ...] = ()

    def is_model(self, module: nn.Module) -> bool:
        """Whether ``module`` is (a subclass of) this family's model; imports nothing."""
        return any(f"{cls.__module__}.{cls.__qualname__}" == self.model_class for cls in type(module).__mro__)


def deferred_build(target: str) -> Callable[[Any, Any], nn.Module]:
    """A record's ``build`` that imports the family's model code (``"package.module:function"``)
    when a model is first built, not when the registry is read: reading configs, plans and costs
    needs no model code."""
    module, _, function = target.partition(":")

    def build(cfg: Any, device: Any) -> nn.Module:
        return getattr(importlib.import_module(module), function)(cfg, device)

    return build


def deferred_module(name: str) -> Callable[[], ModuleType]:
    """A record's ``diffusers_config``: the module ``name``, imported when first asked for."""
    return lambda: importlib.import_module(name)

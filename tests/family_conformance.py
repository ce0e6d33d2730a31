"""Every registered model family at test size, and what tests/test_family_conformance.py feeds it.

The suite's variants come from the registry and the model presets: every full-size preset under
``configs/model/`` (the ``*_tiny`` ones are the families' own test sizes) names its family
(``dit`` when unset), and shrinking it by :data:`TINY` gives a model of the same kind (the same
inputs, experts and clean first frame: ``test_variants_cover_every_family_and_preset`` checks it)
at test size. Presets that shrink to the same model are one variant, named by the first. A new
preset joins by itself; a new family joins too, and fails every case until it has a test size here
and, when it has a diffusers class, an entry in :data:`DIFFUSERS_INPUTS`.

A :class:`Case` is one sample's inputs, packed for imontage and laid out per sample as the family's
diffusers class takes them (:func:`diffusers_kwargs`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from conftest import REPO
from omegaconf import OmegaConf
from safetensors.torch import save_file

from imontage.checkpoint import convert
from imontage.config.schema import ModelConfig
from imontage.models import build_model, packing_spec, registry, trained_experts
from imontage.models.common.family import ModelFamily
from imontage.models.common.sequence import (
    WAN_MASK_CHANNELS,
    PackedBatch,
    Sample,
    Segment,
    pack_samples,
    patchify,
)

PRESETS = REPO / "configs/model"
LATENT = 4  # latent channels of every test-size model
IMAGE_TOKENS = 5


# ----------------------------------------------------------------------------------- test sizes
def _dit(cfg: Any) -> dict[str, Any]:
    """2 blocks of 2 heads x 16; text encoder, position layout and prediction kept."""
    return {"in_channels": LATENT, "patch_size": [1, 2, 2], "hidden_size": 32, "depth": 2, "num_heads": 2,
            "mlp_hidden_size": 64, "text_dim": 24, "max_text_len": 16, "rope": {"bands": [0, 2, 3, 3]}}  # fmt: skip


def _wan(cfg: Any) -> dict[str, Any]:
    """2 blocks of 2 heads x 16; I2V condition channels, CLIP image path, experts, clean first frame
    and the text padding kept (the CLIP I2V cross-attention reads the last 512 rows as text)."""
    wan = cfg.wan
    i2v = int(cfg.in_channels) > int(wan.out_channels)
    return {
        "in_channels": LATENT + (WAN_MASK_CHANNELS + LATENT if i2v else 0), "patch_size": [1, 2, 2],
        "hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_hidden_size": 48, "text_dim": 24,
        "rope": {"bands": [0, 4, 2, 2]},  # diffusers' split of head dim 16
        "wan": {"out_channels": LATENT, "freq_dim": 16, "rope_max_seq_len": 64,
                "image_dim": 20 if int(wan.image_dim) else 0,
                "added_kv_proj_dim": 32 if int(wan.added_kv_proj_dim) else 0},
    }  # fmt: skip


def _hunyuan_video(cfg: Any) -> dict[str, Any]:
    """One dual-, one single-stream and one refiner block of 2 heads x 16; image condition and
    guidance embedding kept."""
    concat = str(cfg.hunyuan_video.image_condition_type) == "latent_concat"
    return {
        "in_channels": 2 * LATENT + 1 if concat else LATENT, "patch_size": [1, 2, 2], "hidden_size": 32,
        "depth": 1, "num_heads": 2, "mlp_hidden_size": 128, "text_dim": 24, "max_text_len": 64,
        "rope": {"bands": [0, 2, 3, 3]},
        "hunyuan_video": {"out_channels": LATENT, "num_single_layers": 1, "num_refiner_layers": 1,
                          "pooled_projection_dim": 12},
    }  # fmt: skip


def _hunyuan_video_15(cfg: Any) -> dict[str, Any]:
    """2 dual-stream blocks and one refiner block of 2 heads x 16, narrow glyph and image tokens;
    the task (T2V or I2V) kept."""
    return {
        "in_channels": 2 * LATENT + 1, "patch_size": [1, 1, 1], "hidden_size": 32, "depth": 2,
        "num_heads": 2, "mlp_hidden_size": 128, "text_dim": 24, "max_text_len": 64,
        "rope": {"bands": [0, 2, 3, 3]},
        "hunyuan_video_15": {"out_channels": LATENT, "num_refiner_layers": 1, "text_embed_2_dim": 20,
                             "image_embed_dim": 12},
    }  # fmt: skip


# A family's model keys that shrink any of its presets to test size, keeping the preset's kind.
TINY: dict[str, Callable[[Any], dict[str, Any]]] = {
    "dit": _dit, "wan": _wan, "hunyuan_video": _hunyuan_video, "hunyuan_video_15": _hunyuan_video_15,
}  # fmt: skip


# -------------------------------------------------------------------------------------- variants
@functools.cache
def preset_config(name: str) -> Any:
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))


def full_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml") if not p.stem.endswith("_tiny"))


@dataclass(frozen=True)
class Variant:
    """Presets of one family that shrink to one test-size model."""

    name: str  # the first preset's
    family: str
    presets: tuple[str, ...]

    @property
    def record(self) -> ModelFamily:
        return registry.family(self.family)

    @property
    def has_diffusers(self) -> bool:
        """Whether the family has a diffusers class to be held to (the DiT has none: it says so by
        an empty ``diffusers_classes``, and its own export stands in)."""
        return bool(self.record.diffusers_classes)

    @property
    def cfg(self) -> Any:
        """The test-size model config; a family without a test size fails here, by name."""
        return tiny_config(self.presets[0])


@functools.cache
def tiny_config(preset: str) -> Any:
    cfg = preset_config(preset)
    family = str(cfg.family)
    assert family in TINY, f"family '{family}' has no test size in tests/family_conformance.py TINY"
    return OmegaConf.merge(cfg, TINY[family](cfg), {"stated_params": 0.0})


@functools.cache
def variants() -> list[Variant]:
    groups: dict[str, list[str]] = {}
    families: dict[str, str] = {}
    for preset in full_presets():
        family = str(preset_config(preset).family)
        key = (
            json.dumps(OmegaConf.to_container(tiny_config(preset)), sort_keys=True)
            if family in TINY
            else preset
        )
        groups.setdefault(key, []).append(preset)
        families[key] = family
    return [Variant(names[0], families[key], tuple(names)) for key, names in groups.items()]


def kind(cfg: Any) -> dict[str, Any]:
    """What a model is, sizes aside: its inputs (present or not), experts and conditioning."""
    record = registry.family(cfg)
    inputs = record.model_inputs(cfg)
    return {
        "family": record.name,
        "inputs": {
            name: value if isinstance(value, str) else bool(value) for name, value in vars(inputs).items()
        },
        "experts": [(e.name, e.t_min, e.t_max) for e in record.experts(cfg)],
        "clean_first_frame": record.clean_first_frame(cfg),
        "layout": str(cfg.positions.layout),
        "text_encoder": str(cfg.text_encoder),
    }


def expert_ranges(cfg: Any) -> list[tuple[str, float, float]]:
    """(network, t_min, t_max) of each network of the model: its experts, or the one ``transformer``."""
    experts = trained_experts(cfg)
    return [(e.name, e.t_min, e.t_max) for e in experts] or [("transformer", 0.0, 1.0)]


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (default inits leave norms at one and some layers at zero, which would
    hide a wrong path), at most 1/sqrt(fan-in) wide so deep paths stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * min(0.2, p.shape[-1] ** -0.5))
    return model


def imontage_model(cfg: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomised(build_model(cfg), seed).eval()


def write_consolidated(
    model: torch.nn.Module, cfg: Any, path: Path, names: Callable[[str], bool] = bool
) -> Path:
    """The tensors of ``model`` that ``names`` keeps, as a consolidated file of the model config ``cfg``."""
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items() if names(n)}
    metadata = {"format": convert.FORMAT, "model_config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
                "step": "0", "weights": "live"}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata)
    return path


# ----------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class DiffusersInputs:
    """The keyword names a family's diffusers class takes its inputs by, and how it takes text."""

    text_mask: str | None  # None: no mask, the text zero-padded to the model's text_len (Wan)
    text_2: str | None = None
    text_2_mask: str | None = None
    image: str | None = None
    image_always: bool = False  # the image tokens are always read (zeros for text-to-video)
    pooled: str | None = None
    guidance: str | None = None


DIFFUSERS_INPUTS = {
    "WanTransformer3DModel": DiffusersInputs(text_mask=None, image="encoder_hidden_states_image"),
    "HunyuanVideoTransformer3DModel": DiffusersInputs(
        text_mask="encoder_attention_mask", pooled="pooled_projections", guidance="guidance"
    ),
    "HunyuanVideo15Transformer3DModel": DiffusersInputs(
        text_mask="encoder_attention_mask",
        text_2="encoder_hidden_states_2",
        text_2_mask="encoder_attention_mask_2",
        image="image_embeds",
        image_always=True,
    ),  # fmt: skip
}
TEXT_PAD, TEXT_2_PAD = 9, 4  # rows the masked texts are padded to in diffusers (random, masked)


class Case:
    """One sample: a target video (or image) of ``grid`` patches, its text and whatever else the
    model reads, at timestep ``t`` (its first latent frame at 0 where the family keeps it clean)."""

    def __init__(self, cfg: Any, g: torch.Generator, grid: tuple[int, int, int], text_len: int, t: float,
                 glyph_len: int = 2, guidance: float = 4.0) -> None:  # fmt: skip
        record = registry.family(cfg)
        inputs = record.model_inputs(cfg)
        self.cfg, self.t = cfg, t
        self.patch = tuple(int(p) for p in cfg.patch_size)
        self.latent = record.latent_channels(cfg)
        self.extra = int(cfg.in_channels) - self.latent  # condition channels (zero without a condition)
        self.clean_first = record.clean_first_frame(cfg)
        shape = [n * p for n, p in zip(grid, self.patch, strict=True)]
        self.latents = torch.randn(self.latent, *shape, generator=g)
        self.condition = torch.randn(self.extra, *shape, generator=g) if inputs.channel_condition else None
        self.text = torch.randn(text_len, int(cfg.text_dim), generator=g)
        dim_2 = inputs.text_embed_2_dim
        self.text_2 = torch.randn(glyph_len, dim_2, generator=g) if dim_2 and glyph_len else None
        self.text_2_dim = dim_2
        self.image = (
            torch.randn(IMAGE_TOKENS, inputs.image_embed_dim, generator=g) if inputs.image_embed_dim else None
        )
        self.pooled = torch.randn(inputs.pooled_text_dim, generator=g) if inputs.pooled_text_dim else None
        self.guidance = guidance if inputs.guidance_embedding else None

    def sample(self) -> Sample:
        segments = [Segment("text", data=self.text)]
        if self.text_2 is not None:
            segments.append(Segment("text", data=self.text_2, encoder=1))
        kind = "image" if self.latents.shape[1] == 1 else "video"
        segments.append(Segment(kind, "target", self.latents, channel_condition=self.condition))
        return Sample(segments, pooled_text=self.pooled, image_embeds=self.image, guidance=self.guidance)

    def token_timesteps(self) -> torch.Tensor:
        """``[T'·H'·W']`` the visual tokens' timesteps, t-major."""
        frames, rows = self.latents.shape[1] // self.patch[0], 1
        for size, p in zip(self.latents.shape[2:], self.patch[1:], strict=True):
            rows *= size // p
        t = torch.full((frames, rows), self.t)
        if self.clean_first:
            t[0] = 0.0
        return t.flatten()


def packed(cases: list[Case], requires_grad: bool = False) -> PackedBatch:
    """The cases packed, each visual token at its case's timestep; with ``requires_grad``, every
    input tensor of the batch a leaf that requires a gradient."""
    batch = pack_samples([case.sample() for case in cases], packing_spec(cases[0].cfg))
    t = torch.zeros(batch.tokens.shape[0])
    for index, case in enumerate(cases):
        t[visual_rows(batch, index)] = case.token_timesteps()
    batch = batch.replace(timesteps=t)
    if requires_grad:
        fields = ("tokens", "text_embeds", "image_embeds", "pooled_text", "channel_condition")
        batch = batch.replace(**{name: getattr(batch, name).clone().requires_grad_(True)
                                 for name in fields if getattr(batch, name) is not None})  # fmt: skip
    return batch


def visual_rows(batch: PackedBatch, sample: int) -> slice:
    (span,) = [s for s in batch.spans if s.sample == sample and s.kind != "text"]
    return slice(span.start, span.start + span.length)


def text_rows(batch: PackedBatch, sample: int) -> list[slice]:
    """The sample's text spans (encoder 0's first, then a second encoder's)."""
    return [
        slice(s.start, s.start + s.length) for s in batch.spans if s.sample == sample and s.kind == "text"
    ]


def diffusers_kwargs(case: Case, class_name: str, requires_grad: bool = False) -> dict[str, Any]:
    """The case as the family's diffusers class takes one sample (batch of one)."""
    spec = DIFFUSERS_INPUTS[class_name]
    g = torch.Generator().manual_seed(99)
    condition = (
        case.condition if case.condition is not None else torch.zeros(case.extra, *case.latents.shape[1:])
    )
    kwargs: dict[str, Any] = {"hidden_states": torch.cat([case.latents, condition])[None]}
    t = case.token_timesteps()
    kwargs["timestep"] = 1000.0 * (t[None] if bool((t != case.t).any()) else torch.tensor([case.t]))

    def masked(rows: torch.Tensor, pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        filler = 100 * torch.randn(pad - len(rows), width, generator=g)  # masked: must not matter
        return torch.cat([rows, filler])[None], torch.cat(
            [torch.ones(len(rows)), torch.zeros(pad - len(rows))]
        )[None]

    if spec.text_mask is None:  # zero-padded to text_len, as the pipeline pads it
        pad = int(case.cfg.wan.text_len) - len(case.text)
        kwargs["encoder_hidden_states"] = torch.cat(
            [case.text, case.text.new_zeros(pad, case.text.shape[1])]
        )[None]
    else:
        kwargs["encoder_hidden_states"], kwargs[spec.text_mask] = masked(
            case.text, TEXT_PAD, case.text.shape[1]
        )
    if spec.text_2 is not None and spec.text_2_mask is not None:
        rows = case.text_2 if case.text_2 is not None else torch.zeros(0, case.text_2_dim)
        kwargs[spec.text_2], kwargs[spec.text_2_mask] = masked(rows, TEXT_2_PAD, case.text_2_dim)
    if spec.image is not None and (case.image is not None or spec.image_always):
        dim = int(case.cfg.hunyuan_video_15.image_embed_dim) if case.image is None else case.image.shape[1]
        kwargs[spec.image] = (case.image if case.image is not None else torch.zeros(IMAGE_TOKENS, dim))[None]
    if spec.pooled is not None:
        kwargs[spec.pooled] = case.pooled[None]  # type: ignore[index]
    if spec.guidance is not None and case.guidance is not None:
        kwargs[spec.guidance] = torch.tensor([1000.0 * case.guidance])
    if requires_grad:
        for name in ("hidden_states", "encoder_hidden_states", spec.text_2, spec.image, spec.pooled):
            if name in kwargs:
                kwargs[name] = kwargs[name].clone().requires_grad_(True)
    return kwargs


def diffusers_rows(
    reference: torch.nn.Module, kwargs: dict[str, Any], patch: tuple[int, ...]
) -> torch.Tensor:
    """diffusers' output on one sample as imontage's visual rows ``[T'·H'·W', C·pt·ph·pw]``."""
    return patchify(reference(**kwargs, return_dict=False)[0][0], patch)


def input_gradients(case: Case, class_name: str, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The gradients of diffusers' inputs, by the batch field that holds the same input in imontage
    (visual and text rows for the sample's own rows; per-sample fields one row)."""
    spec = DIFFUSERS_INPUTS[class_name]
    hidden = kwargs["hidden_states"].grad[0]
    grads = {
        "tokens": patchify(hidden[: case.latent], case.patch),
        "text": kwargs["encoder_hidden_states"].grad[0, : len(case.text)],
    }
    if case.condition is not None:
        grads["channel_condition"] = patchify(hidden[case.latent :], case.patch)
    if case.text_2 is not None and spec.text_2 is not None:
        grads["text_2"] = kwargs[spec.text_2].grad[0, : len(case.text_2)]
    if case.image is not None and spec.image is not None:
        grads["image_embeds"] = kwargs[spec.image].grad[0]
    if case.pooled is not None and spec.pooled is not None:
        grads["pooled_text"] = kwargs[spec.pooled].grad[0]
    return grads


def batch_gradients(batch: PackedBatch, cases: list[Case], index: int) -> dict[str, torch.Tensor]:
    """The same inputs' gradients in imontage's packed batch, for sample ``index``."""
    case, rows = cases[index], visual_rows(batch, index)
    texts = text_rows(batch, index)
    assert (
        batch.tokens.grad is not None and batch.text_embeds is not None and batch.text_embeds.grad is not None
    )
    grads = {
        "tokens": batch.tokens.grad[rows],
        "text": batch.text_embeds.grad[texts[0], : case.text.shape[1]],
    }
    if case.condition is not None:
        assert batch.channel_condition is not None and batch.channel_condition.grad is not None
        grads["channel_condition"] = batch.channel_condition.grad[rows]
    if case.text_2 is not None:
        grads["text_2"] = batch.text_embeds.grad[texts[1], : case.text_2_dim]
    for name in ("image_embeds", "pooled_text"):
        tensor = getattr(batch, name)
        if (
            tensor is not None
            and getattr(case, {"image_embeds": "image", "pooled_text": "pooled"}[name]) is not None
        ):
            grads[name] = tensor.grad[index]
    return grads


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Equal to ``rtol`` of the expected tensor's largest magnitude."""
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert error <= rtol * scale, (
        f"{what}: max error {error:.3g} over max magnitude {scale:.3g} (rtol {rtol})"
    )

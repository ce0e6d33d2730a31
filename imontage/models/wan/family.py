"""Wan 2.1 and 2.2 (text- and image-to-video) as a model family: the record :mod:`imontage.models.registry` lists."""

from __future__ import annotations

from typing import Any

from torch import nn

from imontage.models.common.family import (
    Expert,
    LatentFormat,
    ModelFamily,
    ModelInputs,
    VaeSpec,
    deferred_build,
    deferred_module,
)
from imontage.models.common.parallel_plan import COLUMNS, ROWS, BlockPlan, FamilyPlan, TensorSplit, linears
from imontage.models.common.sequence import WAN_MASK_CHANNELS
from imontage.models.wan.config import WanConfig
from imontage.models.wan.cost import COST
from imontage.models.wan.keyframes import keyframe_condition


def _splits() -> dict[str, TensorSplit]:
    splits: dict[str, TensorSplit] = {}
    for attention in ("attn1", "attn2"):  # to_q, to_k, to_v: [H·Dh, d], output rows head-major
        linears(splits, ROWS, *(f"{attention}.{linear}" for linear in ("to_q", "to_k", "to_v")))
        linears(splits, COLUMNS, f"{attention}.to_out.0")  # [d, H·Dh]
        splits |= {f"{attention}.norm_q.weight": ROWS, f"{attention}.norm_k.weight": ROWS}  # [H·Dh]
    linears(splits, ROWS, "attn2.add_k_proj", "attn2.add_v_proj")  # I2V: the image tokens' keys, values
    splits["attn2.norm_added_k.weight"] = ROWS
    return linears(linears(splits, ROWS, "ffn.net.0.proj"), COLUMNS, "ffn.net.2")


# Wan 2.1's blocks, by diffusers' parameter names (an I2V block has the add_* entries too).
TENSOR_PARALLEL_SPLITS: dict[str, TensorSplit] = _splits()
PARALLEL_PLAN = FamilyPlan(
    {
        "blocks": BlockPlan(
            TENSOR_PARALLEL_SPLITS,
            heads="attn1",
            head_modules=("attn1", "attn2"),
            mlp="ffn.net.0.proj",
            self_attentions=("attn1",),  # the cross-attention runs on the rank's own query tokens
            whole_inputs=("attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj"),
            token_partial=("scale_shift_table", "norm2.weight", "norm2.bias"),
        )
    }
)


def model_inputs(cfg: Any) -> ModelInputs:
    """CLIP image tokens for I2V (``model.wan.image_dim``), and the I2V mask + condition channels
    (diffusers' WanImageToVideoPipeline.prepare_latents) when ``in_channels`` has room for them."""
    latent, extra = int(cfg.wan.out_channels), int(cfg.in_channels) - int(cfg.wan.out_channels)
    if extra not in (0, WAN_MASK_CHANNELS + latent):
        raise ValueError(
            f"model.in_channels={cfg.in_channels}: a Wan model takes its {latent} latent channels, plus "
            f"{WAN_MASK_CHANNELS} mask + {latent} condition channels for image-to-video ({2 * latent + 4})"
        )
    return ModelInputs(
        image_embed_dim=int(cfg.wan.image_dim),
        channel_condition="wan_i2v" if extra else "",
        keyframe_condition=keyframe_condition if extra else None,
    )


def clean_first_frame(cfg: Any) -> bool:
    """Wan 2.2 TI2V's image-to-video (``expand_timesteps``) keeps each target video's first latent
    frame clean, at timestep 0 token by token."""
    return bool(cfg.wan.expand_timesteps)


def experts(cfg: Any) -> tuple[Expert, ...]:
    """Wan 2.2 A14B's pair (``wan.boundary_ratio`` set), by their pipeline components: ``transformer``
    denoises t >= the boundary, ``transformer_2`` the rest, as the pipelines switch them."""
    ratio = float(cfg.wan.boundary_ratio)
    if ratio <= 0:
        return ()
    return (Expert("transformer", ratio, 1.0), Expert("transformer_2", 0.0, ratio))


def validate(cfg: Any) -> list[tuple[str, str]]:
    problems = []
    ratio = float(cfg.wan.boundary_ratio)
    if not 0.0 <= ratio < 1.0:
        problems.append(("wan.boundary_ratio", f"{ratio} is not in [0, 1) (0: a single model)"))
    if bool(cfg.wan.expand_timesteps):
        # The clean first frame is the image itself, so it needs its own latent frame and no
        # condition channels beside the noisy ones.
        if int(cfg.patch_size[0]) != 1:
            problems.append(("wan.expand_timesteps", f"needs patch_size[0] = 1, got {cfg.patch_size[0]}"))
        if int(cfg.in_channels) != int(cfg.wan.out_channels):
            problems.append(
                ("wan.expand_timesteps", f"needs in_channels = wan.out_channels, got {cfg.in_channels}")
            )
    return problems


def _text_width(module: nn.Module) -> int:
    return int(module.condition_embedder.text_embedder.linear_1.in_features)  # type: ignore[union-attr, arg-type]


def wan_latents(config: Any) -> LatentFormat:
    """AutoencoderKLWan's latents: ``z_dim`` channels normalised ``(z - latents_mean) / latents_std``,
    as the Wan pipelines do (Wan 2.1's 16 channels and Wan 2.2's 48 are two configs of it)."""
    mean, std = config.latents_mean, config.latents_std
    if len(mean) != config.z_dim or len(std) != config.z_dim:
        raise ValueError(
            f"latents_mean/latents_std have {len(mean)}/{len(std)} values, z_dim is {config.z_dim}"
        )
    return LatentFormat(
        int(config.z_dim),
        int(config.scale_factor_temporal or 2 ** sum(config.temperal_downsample)),
        int(config.scale_factor_spatial or 2 ** len(config.temperal_downsample)),
        tuple(float(m) for m in mean),
        tuple(1.0 / float(s) for s in std),
    )


FAMILY = ModelFamily(
    name="wan",
    summary="Wan 2.1 and 2.2 text- and image-to-video (diffusers' WanTransformer3DModel)",
    build=deferred_build("imontage.models.wan.model:build_wan"),
    model_class="imontage.models.wan.model.WanTransformer",
    parallel_plan=PARALLEL_PLAN,
    config_section=WanConfig,
    model_inputs=model_inputs,
    latent_channels=lambda cfg: int(cfg.wan.out_channels),
    clean_first_frame=clean_first_frame,
    validate=validate,
    precomputed_text=True,
    predictions=("velocity",),
    diffusers_classes=("WanTransformer3DModel",),
    diffusers_config=deferred_module("imontage.models.wan.diffusers_config"),
    imagic_text_width=_text_width,
    cost=COST,
    experts=experts,
    vaes=(VaeSpec("AutoencoderKLWan", wan_latents, streams=True, i2v_condition=True),),
)

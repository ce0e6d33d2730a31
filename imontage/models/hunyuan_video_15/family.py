"""HunyuanVideo 1.5 (text- and image-to-video) as a model family: the record :mod:`imontage.models.registry` lists."""

from __future__ import annotations

from typing import Any

from imontage.models.common.dual_stream import DUAL_STREAM_BLOCKS
from imontage.models.common.family import (
    ModelFamily,
    ModelInputs,
    SamplingDefaults,
    deferred_build,
    deferred_module,
)
from imontage.models.common.parallel_plan import FamilyPlan
from imontage.models.hunyuan_video_15.config import HunyuanVideo15Config
from imontage.models.hunyuan_video_15.cost import COST

TASK_TYPES = ("t2v", "i2v")  # model.hunyuan_video_15.task_type
# Its blocks are the dual-stream blocks HunyuanVideo also has, cut the same way; no single-stream ones.
PARALLEL_PLAN = FamilyPlan({"transformer_blocks": DUAL_STREAM_BLOCKS})


def model_inputs(cfg: Any) -> ModelInputs:
    """I2V: the condition image's SigLIP tokens and its latent + 1 mask channel (diffusers'
    HunyuanVideo15ImageToVideoPipeline); T2V reads neither (the channels stay zero)."""
    hv = cfg.hunyuan_video_15
    latent, i2v = int(hv.out_channels), str(hv.task_type) == "i2v"
    if int(cfg.in_channels) != 2 * latent + 1:
        raise ValueError(
            f"model.in_channels={cfg.in_channels}: HunyuanVideo 1.5 takes {2 * latent + 1} channels "
            f"({latent} latent + {latent} image latent + 1 mask), zero for text-to-video"
        )
    return ModelInputs(
        image_embed_dim=int(hv.image_embed_dim) if i2v else 0,
        channel_condition="latent_concat" if i2v else "",
    )


def validate(cfg: Any) -> list[tuple[str, str]]:
    task = str(cfg.hunyuan_video_15.task_type)
    if task not in TASK_TYPES:
        return [("hunyuan_video_15.task_type", f"'{task}' is not one of {', '.join(TASK_TYPES)}")]
    return []


FAMILY = ModelFamily(
    name="hunyuan_video_15",
    summary="HunyuanVideo 1.5 text- and image-to-video (diffusers' HunyuanVideo15Transformer3DModel)",
    build=deferred_build("imontage.models.hunyuan_video_15.model:build_hunyuan_video_15"),
    model_class="imontage.models.hunyuan_video_15.model.HunyuanVideo15Transformer",
    parallel_plan=PARALLEL_PLAN,
    config_section=HunyuanVideo15Config,
    model_inputs=model_inputs,
    latent_channels=lambda cfg: int(cfg.hunyuan_video_15.out_channels),
    validate=validate,
    precomputed_text=True,
    predictions=("velocity",),
    diffusers_classes=("HunyuanVideo15Transformer3DModel",),
    diffusers_config=deferred_module("imontage.models.hunyuan_video_15.diffusers_config"),
    # The public inference's classifier-free guidance scale, with an empty negative prompt.
    sampling=SamplingDefaults(guidance=6.0),
    cost=COST,
)

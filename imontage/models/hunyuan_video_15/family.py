"""HunyuanVideo 1.5 (text- and image-to-video) as a model family: the record :mod:`imontage.models.registry` lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from imontage.models.common.dual_stream import DUAL_STREAM_BLOCKS
from imontage.models.common.family import (
    ImageEncoding,
    ModelFamily,
    ModelInputs,
    SamplingDefaults,
    TextEncoding,
    VaeSpec,
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
        text_embed_2_dim=int(hv.text_embed_2_dim),
    )


def _pipeline_defaults(method: str) -> dict[str, Any]:
    """The default arguments of ``HunyuanVideo15Pipeline.<method>``: the values its ``encode_prompt``
    passes (its ``system_message``, ``prompt_template_encode_start_idx``, ``tokenizer_max_length``
    and ``tokenizer_2_max_length`` are set to the same in its ``__init__``)."""
    import inspect

    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    parameters = inspect.signature(getattr(HunyuanVideo15Pipeline, method)).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def text_encoding() -> TextEncoding:
    """What diffusers' ``HunyuanVideo15Pipeline._get_mllm_prompt_embeds`` feeds the transformer (its
    Qwen2.5-VL ``text_encoder``), with its defaults: the prompt as the user turn of a chat with its
    ``system_message``, the generation prompt added, padded to ``tokenizer_max_length`` (1000) +
    ``crop_start`` (108), ``hidden_states[-(num_hidden_layers_to_skip + 1)]`` (skip 2), the first
    ``crop_start`` tokens (the system turn's) dropped."""
    defaults = _pipeline_defaults("_get_mllm_prompt_embeds")
    return TextEncoding(
        template="{}",
        crop_start=int(defaults["crop_start"]),
        hidden_state=-(int(defaults["num_hidden_layers_to_skip"]) + 1),
        max_length=int(defaults["tokenizer_max_length"]),
        pad=True,
        chat_system=str(defaults["system_message"]),
    )


def text_encoding_2() -> TextEncoding:
    """What ``HunyuanVideo15Pipeline._get_byt5_prompt_embeds`` feeds the transformer (its ByT5
    ``text_encoder_2``, a T5 encoder): the prompt's quoted strings as its ``extract_glyph_texts``
    formats them (none: no rows, as the pipeline masks all of its zeros), padded to
    ``tokenizer_max_length`` (256), the last hidden state."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    defaults = _pipeline_defaults("_get_byt5_prompt_embeds")
    return TextEncoding(
        template="{}",
        crop_start=0,
        hidden_state=None,
        max_length=int(defaults["tokenizer_max_length"]),
        pad=True,
        # Annotated as giving list[str]; it gives the formatted string, or None without quoted text.
        select=cast(Callable[[str], str | None], extract_glyph_texts),
    )


def image_encoding() -> ImageEncoding:
    """``HunyuanVideo15ImageToVideoPipeline._get_image_embeds``: the condition image through its
    ``feature_extractor`` (a ``SiglipImageProcessor``, resizing) and its SigLIP ``image_encoder``,
    whose ``last_hidden_state`` it reads."""
    return ImageEncoding("SiglipImageProcessor", None)


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
    text_encoding=text_encoding,
    text_encoding_2=text_encoding_2,
    image_encoding=image_encoding,
    cost=COST,
    vaes=(VaeSpec("AutoencoderKLHunyuanVideo15"),),
)

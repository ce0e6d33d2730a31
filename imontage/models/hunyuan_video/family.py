"""HunyuanVideo (text- and image-to-video) as a model family: the record :mod:`imontage.models.registry` lists."""

from __future__ import annotations

from functools import partial
from typing import Any

from imontage.models.common.dual_stream import DUAL_STREAM_BLOCKS, MODULATION
from imontage.models.common.family import (
    ImageInText,
    ModelFamily,
    ModelInputs,
    SamplingDefaults,
    TextEncoding,
    VaeSpec,
    deferred_build,
    deferred_module,
)
from imontage.models.common.parallel_plan import (
    ROWS,
    BlockPlan,
    FamilyPlan,
    JoinedInputSplit,
    TensorSplit,
    linears,
)
from imontage.models.hunyuan_video.config import HunyuanVideoConfig
from imontage.models.hunyuan_video.cost import COST
from imontage.models.hunyuan_video.keyframes import keyframe_condition

IMAGE_CONDITIONS = ("", "latent_concat", "token_replace")  # model.hunyuan_video.image_condition_type

# The single-stream blocks; the dual-stream ones are cut as every dual-stream family's.
SINGLE_SPLITS: dict[str, TensorSplit] = linears(
    {"proj_out.weight": JoinedInputSplit()}, ROWS, "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"
)
PARALLEL_PLAN = FamilyPlan(
    {
        "transformer_blocks": DUAL_STREAM_BLOCKS,
        "single_transformer_blocks": BlockPlan(
            SINGLE_SPLITS,
            heads="attn",
            head_modules=("attn",),
            mlp="proj_mlp",
            self_attentions=("attn",),
            head_partial=("attn.norm_q.weight", "attn.norm_k.weight"),
            token_partial=tuple(f"norm.{p}" for p in MODULATION),
        ),
    }
)


def model_inputs(cfg: Any) -> ModelInputs:
    """The pooled CLIP text vector, the distilled-guidance embedding, and for ``latent_concat`` I2V
    the condition image's latent + 1 mask channel (diffusers' HunyuanVideoImageToVideoPipeline)."""
    hv = cfg.hunyuan_video
    latent, condition = int(hv.out_channels), str(hv.image_condition_type)
    expected = 2 * latent + 1 if condition == "latent_concat" else latent
    if int(cfg.in_channels) != expected:
        raise ValueError(
            f"model.in_channels={cfg.in_channels}: HunyuanVideo with image_condition_type "
            f"'{condition}' takes {expected} channels"
            + (f" ({latent} latent + {latent} image latent + 1 mask)" if expected != latent else "")
        )
    return ModelInputs(
        pooled_text_dim=int(hv.pooled_projection_dim),
        channel_condition="latent_concat" if condition == "latent_concat" else "",
        keyframe_condition=keyframe_condition if condition == "latent_concat" else None,
        guidance_embedding=bool(hv.guidance_embeds),
    )


def clean_first_frame(cfg: Any) -> bool:
    """``token_replace`` I2V keeps each target video's first latent frame clean, modulated at t = 0."""
    if str(cfg.hunyuan_video.image_condition_type) != "token_replace":
        return False
    if int(cfg.patch_size[0]) != 1:
        raise ValueError(
            f"image_condition_type token_replace keeps one latent frame clean: it needs patch_size[0] = 1, "
            f"got {cfg.patch_size[0]}"
        )
    return True


def validate(cfg: Any) -> list[tuple[str, str]]:
    condition = str(cfg.hunyuan_video.image_condition_type)
    if condition not in IMAGE_CONDITIONS:
        return [
            (
                "hunyuan_video.image_condition_type",
                f"'{condition}' is not one of {', '.join(IMAGE_CONDITIONS)}",
            )
        ]
    return []


def text_encoding() -> TextEncoding:
    """What diffusers' ``HunyuanVideoPipeline._get_llama_prompt_embeds`` feeds the transformer, with
    its defaults: the prompt in its ``DEFAULT_PROMPT_TEMPLATE`` (read from diffusers), ``crop_start``
    95, ``hidden_states[-(num_hidden_layers_to_skip + 1)]`` with skip 2, ``max_sequence_length`` 256,
    padded to ``max_sequence_length + crop_start``."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template: dict[str, Any] = DEFAULT_PROMPT_TEMPLATE
    return TextEncoding(str(template["template"]), int(template["crop_start"]), -3, 256, pad=True)


def i2v_text_encoding(image_condition_type: str) -> TextEncoding:
    """What diffusers' ``HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds`` feeds a transformer
    of ``image_condition_type``, with the defaults its ``encode_prompt`` and ``__call__`` pass: the
    prompt in its ``DEFAULT_PROMPT_TEMPLATE`` (read from diffusers: one ``<image>`` at token
    ``image_emb_start`` 5 standing for ``image_emb_len`` 576 image tokens, ``crop_start`` 103), through
    the LLaVA with the condition image (its ``CLIPImageProcessor``), ``hidden_states[-3]``
    (``num_hidden_layers_to_skip`` 2), ``max_sequence_length`` 256 padded; kept: the image tokens'
    rows, every ``image_embed_interleave``-th (2 for ``latent_concat``, 4 for ``token_replace``), then
    the text's after the crop without the 4 tokens that open the assistant turn."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    template: dict[str, Any] = DEFAULT_PROMPT_TEMPLATE
    interleave = {"latent_concat": 2, "token_replace": 4}[image_condition_type]
    start, end, tokens = (int(template[k]) for k in ("image_emb_start", "image_emb_end", "image_emb_len"))
    if end - start != tokens:
        raise ValueError(
            f"diffusers' HunyuanVideo-I2V template spans {end - start} image tokens, not {tokens}"
        )
    image = ImageInText("CLIPImageProcessor", tokens, start, interleave, "<|end_header_id|>", 4)
    return TextEncoding(
        str(template["template"]), int(template["crop_start"]), -3, 256, pad=True, image=image
    )


# HunyuanVideo-I2V's text recipes, by image_condition_type (which sets the pipeline's interleave).
I2V_TEXT_RECIPES = {"hunyuan_video_i2v": "latent_concat", "hunyuan_video_i2v_token_replace": "token_replace"}


FAMILY = ModelFamily(
    name="hunyuan_video",
    summary="HunyuanVideo text- and image-to-video (diffusers' HunyuanVideoTransformer3DModel)",
    build=deferred_build("imontage.models.hunyuan_video.model:build_hunyuan_video"),
    model_class="imontage.models.hunyuan_video.model.HunyuanVideoTransformer",
    parallel_plan=PARALLEL_PLAN,
    config_section=HunyuanVideoConfig,
    model_inputs=model_inputs,
    latent_channels=lambda cfg: int(cfg.hunyuan_video.out_channels),
    clean_first_frame=clean_first_frame,
    validate=validate,
    precomputed_text=True,
    predictions=("velocity",),
    diffusers_classes=("HunyuanVideoTransformer3DModel",),
    diffusers_config=deferred_module("imontage.models.hunyuan_video.diffusers_config"),
    # Pretrained with true classifier-free guidance off (distilled guidance embedded instead): its
    # unconditional pass, when asked for, must be named.
    sampling=SamplingDefaults(guidance=1.0, negative_required=True),
    text_encoding=text_encoding,
    other_text_encodings=tuple(
        (name, partial(i2v_text_encoding, condition)) for name, condition in I2V_TEXT_RECIPES.items()
    ),
    cost=COST,
    vaes=(VaeSpec("AutoencoderKLHunyuanVideo"),),
)

"""diffusers' ``HunyuanVideo15Transformer3DModel`` config.json <-> imontage's ``model`` section.

Used by the diffusers folder importer. Keys or values imontage cannot represent raise
``ValueError`` naming the key, rather than loading a model that computes something else. The keys
it shares with HunyuanVideo (widths, patch, RoPE) map as HunyuanVideo's do.
"""

from __future__ import annotations

from typing import Any

from imontage.models.common.dual_stream_config import (
    config_value,
    diffusers_shared_keys,
    shared_keys,
    with_defaults,
)

CLASS_NAME = "HunyuanVideo15Transformer3DModel"
TASK_TYPES = ("t2v", "i2v")
# diffusers' defaults, for keys a config.json leaves out (diffusers fills them the same way).
DEFAULTS: dict[str, Any] = {
    "in_channels": 65,
    "out_channels": 32,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 54,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "text_embed_dim": 3584,
    "text_embed_2_dim": 1472,
    "image_embed_dim": 1152,
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
    "target_size": 640,
    "task_type": "i2v",
    "use_meanflow": False,
}
MAX_TEXT_LEN = 1000  # the pipelines' tokenizer_max_length (Qwen2.5-VL tokens after the template)


def model_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """A ``ModelConfig`` dict (``family: hunyuan_video_15``) from diffusers' transformer config.json."""
    c = with_defaults(config, DEFAULTS, CLASS_NAME)
    if c["use_meanflow"]:
        raise ValueError(
            "diffusers config key 'use_meanflow': true (a second, reference timestep) is not supported"
        )
    if c["task_type"] not in TASK_TYPES:
        raise ValueError(f"diffusers config key 'task_type': {c['task_type']!r} is not one of {TASK_TYPES}")
    return {
        "family": "hunyuan_video_15",
        **shared_keys(c),
        "max_text_len": MAX_TEXT_LEN,
        "hunyuan_video_15": {
            "out_channels": int(c["out_channels"] or c["in_channels"]),
            "num_refiner_layers": int(c["num_refiner_layers"]),
            "text_embed_2_dim": int(c["text_embed_2_dim"]),
            "image_embed_dim": int(c["image_embed_dim"]),
            "task_type": str(c["task_type"]),
            "target_size": int(c["target_size"]),
        },
    }


def diffusers_config(model_cfg: Any) -> dict[str, Any]:
    """diffusers' config.json dict (with ``_class_name``) of a ``hunyuan_video_15`` model section.

    ``model_cfg``: a ``ModelConfig`` dataclass, OmegaConf node or plain dict.
    """
    if config_value(model_cfg, "family") != "hunyuan_video_15":
        raise ValueError(f"model.family '{config_value(model_cfg, 'family')}': not a HunyuanVideo 1.5 model")
    hv = config_value(model_cfg, "hunyuan_video_15")
    return {
        "_class_name": CLASS_NAME,
        **diffusers_shared_keys(model_cfg, "HunyuanVideo 1.5"),
        "out_channels": int(config_value(hv, "out_channels")),
        "num_refiner_layers": int(config_value(hv, "num_refiner_layers")),
        "text_embed_2_dim": int(config_value(hv, "text_embed_2_dim")),
        "image_embed_dim": int(config_value(hv, "image_embed_dim")),
        "target_size": int(config_value(hv, "target_size")),
        "task_type": str(config_value(hv, "task_type")),
        "use_meanflow": False,
    }


def pipeline_transformers(model_cfg: Any) -> tuple[str, ...]:
    """The pipeline components that hold the model: its one ``transformer``."""
    return ("transformer",)


def model_config_from_pipeline(index: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` keys ``model_index.json`` sets: none (the pipeline class follows task_type)."""
    return {}


def pipeline_config(model_cfg: Any) -> dict[str, Any]:
    """The keys of ``model_index.json`` the model config sets: the pipeline class of its task."""
    i2v = str(config_value(config_value(model_cfg, "hunyuan_video_15"), "task_type")) == "i2v"
    return {"_class_name": "HunyuanVideo15ImageToVideoPipeline" if i2v else "HunyuanVideo15Pipeline"}

"""diffusers' ``HunyuanVideoTransformer3DModel`` config.json <-> imontage's ``model`` section.

Used by the diffusers folder importer. Keys or values imontage cannot represent raise
``ValueError`` naming the key, rather than loading a model that computes something else.
"""

from __future__ import annotations

from typing import Any

from imontage.models.common.dual_stream_config import (
    config_value,
    diffusers_shared_keys,
    shared_keys,
    with_defaults,
)

CLASS_NAME = "HunyuanVideoTransformer3DModel"
IMAGE_CONDITIONS = ("latent_concat", "token_replace")
# diffusers' defaults, for keys a config.json leaves out (diffusers fills them the same way).
DEFAULTS: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
    "image_condition_type": None,
}
MAX_TEXT_LEN = 256  # the pipelines' max_sequence_length


def model_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """A ``ModelConfig`` dict (``family: hunyuan_video``) from diffusers' transformer config.json."""
    c = with_defaults(config, DEFAULTS, CLASS_NAME)
    condition = c["image_condition_type"]
    if condition is not None and condition not in IMAGE_CONDITIONS:
        raise ValueError(
            f"diffusers config key 'image_condition_type': {condition!r} is not one of {IMAGE_CONDITIONS}"
        )
    return {
        "family": "hunyuan_video",
        **shared_keys(c),
        "max_text_len": MAX_TEXT_LEN,
        "hunyuan_video": {
            "out_channels": int(c["out_channels"] or c["in_channels"]),
            "num_single_layers": int(c["num_single_layers"]),
            "num_refiner_layers": int(c["num_refiner_layers"]),
            "pooled_projection_dim": int(c["pooled_projection_dim"]),
            "guidance_embeds": bool(c["guidance_embeds"]),
            "image_condition_type": condition or "",
        },
    }


def diffusers_config(model_cfg: Any) -> dict[str, Any]:
    """diffusers' config.json dict (with ``_class_name``) of a ``hunyuan_video`` model section.

    ``model_cfg``: a ``ModelConfig`` dataclass, OmegaConf node or plain dict.
    """
    if config_value(model_cfg, "family") != "hunyuan_video":
        raise ValueError(f"model.family '{config_value(model_cfg, 'family')}': not a HunyuanVideo model")
    hv = config_value(model_cfg, "hunyuan_video")
    condition = str(config_value(hv, "image_condition_type"))
    return {
        "_class_name": CLASS_NAME,
        **diffusers_shared_keys(model_cfg, "HunyuanVideo"),
        "out_channels": int(config_value(hv, "out_channels")),
        "num_single_layers": int(config_value(hv, "num_single_layers")),
        "num_refiner_layers": int(config_value(hv, "num_refiner_layers")),
        "guidance_embeds": bool(config_value(hv, "guidance_embeds")),
        "pooled_projection_dim": int(config_value(hv, "pooled_projection_dim")),
        "image_condition_type": condition or None,
    }

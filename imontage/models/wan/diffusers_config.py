"""diffusers' ``WanTransformer3DModel`` config (its ``config.json``) <-> imontage's model config (family ``wan``).

Measured against diffusers 0.42.1: the RoPE splits the head dim ``D`` into ``h = w = 2·(D//6)``
channels and ``t = D − h − w``, rotated as interleaved pairs with theta 10000 (DESIGN.md,
"Pretrained families"); the public pipeline pads the UMT5 text to 512 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CLASS_NAME = "WanTransformer3DModel"
# Every key of the class's config; diffusers' bookkeeping keys start with "_" and are ignored.
KEYS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "image_dim", "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
)  # fmt: skip
QK_NORM = "rms_norm_across_heads"  # the only one imontage's Wan implements
TEXT_LEN = 512
ROPE_THETA = 10000.0


def rope_bands(head_dim: int) -> list[int]:
    """Rotary pairs per axis (s, t, h, w) of Wan's RoPE for ``head_dim``: (0, 22, 21, 21) for 128."""
    spatial = head_dim // 6  # pairs of h and of w: 2·(D//6) channels each
    return [0, (head_dim - 4 * spatial) // 2, spatial, spatial]


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"key '{key}': {value!r} is not a positive integer")
    return value


def _optional_int(config: Mapping[str, Any], key: str) -> int:
    """``None`` (the feature is off) as 0, as imontage's ``model.wan`` section stores it."""
    value = config.get(key)
    return 0 if value is None else _int(config, key)


def model_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The imontage ``model`` section (a plain dict) of a ``WanTransformer3DModel`` config.

    An unknown key, a missing one, or a value imontage's Wan does not implement raises a
    ``ValueError`` naming the key (the caller adds the file).
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in KEYS)
    if unknown:
        raise ValueError(f"key '{unknown[0]}' is not a {CLASS_NAME} config key (known: {', '.join(KEYS)})")
    missing = [
        k
        for k in KEYS
        if k not in config and k not in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
    ]
    if missing:
        raise ValueError(f"key '{missing[0]}' is missing")
    if config["qk_norm"] != QK_NORM:
        raise ValueError(f"key 'qk_norm': {config['qk_norm']!r} is not supported (only '{QK_NORM}')")
    if config.get("pos_embed_seq_len") is not None:
        raise ValueError(
            f"key 'pos_embed_seq_len': {config['pos_embed_seq_len']!r} is not supported (only null: "
            "no learned image position embedding)"
        )
    patch = config["patch_size"]
    if (
        not isinstance(patch, list | tuple)
        or len(patch) != 3
        or not all(isinstance(p, int) and p > 0 for p in patch)
    ):
        raise ValueError(f"key 'patch_size': {patch!r} is not three positive integers (pt, ph, pw)")
    if not isinstance(config["cross_attn_norm"], bool):
        raise ValueError(f"key 'cross_attn_norm': {config['cross_attn_norm']!r} is not a boolean")
    eps = config["eps"]
    if isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0:
        raise ValueError(f"key 'eps': {eps!r} is not a positive number")
    heads, head_dim = _int(config, "num_attention_heads"), _int(config, "attention_head_dim")
    if head_dim % 2:
        raise ValueError(f"key 'attention_head_dim': {head_dim} is odd (RoPE needs pairs)")
    return {
        "family": "wan",
        "in_channels": _int(config, "in_channels"),
        "patch_size": list(patch),
        "hidden_size": heads * head_dim,
        "depth": _int(config, "num_layers"),
        "num_heads": heads,
        "mlp_hidden_size": _int(config, "ffn_dim"),
        "text_encoder": "precomputed",
        "text_dim": _int(config, "text_dim"),
        "max_text_len": TEXT_LEN,
        "qk_norm": True,
        "rope": {"bands": rope_bands(head_dim), "theta": [ROPE_THETA] * 4, "pair_layout": "interleaved"},
        "positions": {"layout": "video3d"},
        "wan": {
            "out_channels": _int(config, "out_channels"),
            "freq_dim": _int(config, "freq_dim"),
            "eps": float(eps),
            "cross_attn_norm": config["cross_attn_norm"],
            "image_dim": _optional_int(config, "image_dim"),
            "added_kv_proj_dim": _optional_int(config, "added_kv_proj_dim"),
            "text_len": TEXT_LEN,
            "rope_max_seq_len": _int(config, "rope_max_seq_len"),
        },
    }


def diffusers_config(model_cfg: Any) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` config (without ``_class_name``) of an imontage model config.

    Raises ``ValueError`` naming the key when the config has no diffusers equivalent (a RoPE or
    QK-norm that the class does not compute).
    """
    if str(model_cfg.family) != "wan":
        raise ValueError(f"key 'model.family': '{model_cfg.family}' is not wan")
    heads = int(model_cfg.num_heads)
    head_dim = int(model_cfg.hidden_size) // heads
    expected = {
        "rope.bands": (list(model_cfg.rope.bands), rope_bands(head_dim)),
        "rope.theta": ([float(t) for t in model_cfg.rope.theta], [ROPE_THETA] * 4),
        "rope.pair_layout": (model_cfg.rope.pair_layout, "interleaved"),
        "qk_norm": (bool(model_cfg.qk_norm), True),
    }
    for key, (value, wanted) in expected.items():
        if value != wanted:
            raise ValueError(f"key 'model.{key}': {value!r}; {CLASS_NAME} computes {wanted!r}")
    wan = model_cfg.wan
    return {
        "patch_size": [int(p) for p in model_cfg.patch_size],
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": int(model_cfg.in_channels),
        "out_channels": int(wan.out_channels),
        "text_dim": int(model_cfg.text_dim),
        "freq_dim": int(wan.freq_dim),
        "ffn_dim": int(model_cfg.mlp_hidden_size),
        "num_layers": int(model_cfg.depth),
        "cross_attn_norm": bool(wan.cross_attn_norm),
        "qk_norm": QK_NORM,
        "eps": float(wan.eps),
        "image_dim": int(wan.image_dim) or None,
        "added_kv_proj_dim": int(wan.added_kv_proj_dim) or None,
        "rope_max_seq_len": int(wan.rope_max_seq_len),
        "pos_embed_seq_len": None,
    }


# ------------------------------------------------------------------------------ pipeline folders
HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"  # the pipeline components of the A14B pair


def pipeline_transformers(model_cfg: Any) -> tuple[str, ...]:
    """The pipeline components that hold the model's transformers: the A14B pair (a boundary set),
    high-noise ``transformer`` first, or the one ``transformer``."""
    return (HIGH_NOISE, LOW_NOISE) if float(model_cfg.wan.boundary_ratio) > 0 else (HIGH_NOISE,)


def model_config_from_pipeline(index: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` keys that ``model_index.json`` of a Wan pipeline sets (over those its
    transformer's ``config.json`` gives): ``wan.boundary_ratio`` (null: 0) and ``wan.expand_timesteps``."""
    ratio = index.get("boundary_ratio")
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1
    ):
        raise ValueError(f"key 'boundary_ratio': {ratio!r} is neither null nor a number in (0, 1)")
    expand = index.get("expand_timesteps", False)
    if not isinstance(expand, bool):
        raise ValueError(f"key 'expand_timesteps': {expand!r} is not a boolean")
    return {"wan": {"boundary_ratio": float(ratio or 0.0), "expand_timesteps": expand}}


def pipeline_config(model_cfg: Any) -> dict[str, Any]:
    """The keys of ``model_index.json`` that the model config sets: the pipeline class (image-to-video
    when the model takes condition channels), ``boundary_ratio`` and ``expand_timesteps``."""
    i2v = int(model_cfg.in_channels) > int(model_cfg.wan.out_channels)
    ratio = float(model_cfg.wan.boundary_ratio)
    return {
        "_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline",
        "boundary_ratio": ratio or None,
        "expand_timesteps": bool(model_cfg.wan.expand_timesteps),
    }

"""diffusers' config.json keys that the HunyuanVideo-style (dual-stream) transformers share, both
ways: a config.json's widths, patch and RoPE to imontage's ``model`` keys, and back.

Keys or values imontage cannot represent raise ``ValueError`` naming the key, rather than loading
a model that computes something else.
"""

from __future__ import annotations

from typing import Any


def with_defaults(config: dict[str, Any], defaults: dict[str, Any], class_name: str) -> dict[str, Any]:
    """``config`` (a config.json) over ``defaults``, its metadata dropped; an unknown key or another
    class raises ``ValueError`` naming the key."""
    for key in config:
        if key.startswith("_"):
            continue  # metadata: _class_name, _diffusers_version, _name_or_path, _use_default_values
        if key not in defaults:
            raise ValueError(f"diffusers config key '{key}' is not one {class_name}'s importer knows")
    name = config.get("_class_name", class_name)
    if name != class_name:
        raise ValueError(f"diffusers config key '_class_name': {name}, expected {class_name}")
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c["qk_norm"] != "rms_norm":
        raise ValueError(f"diffusers config key 'qk_norm': {c['qk_norm']!r}, only 'rms_norm' is supported")
    return c


def shared_keys(c: dict[str, Any]) -> dict[str, Any]:
    """The shared ``model`` keys of a HunyuanVideo-style config (``c``: :func:`with_defaults`'s):
    widths, patch, RoPE (t, h, w bands over the whole head, interleaved), velocity prediction."""
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    axes = [int(d) for d in c["rope_axes_dim"]]
    if len(axes) != 3 or any(d % 2 for d in axes) or sum(axes) != head_dim:
        raise ValueError(
            f"diffusers config key 'rope_axes_dim': {axes} must be three even sizes (t, h, w) summing "
            f"to attention_head_dim {head_dim}"
        )
    hidden = heads * head_dim
    mlp_hidden = int(hidden * float(c["mlp_ratio"]))
    if mlp_hidden / hidden != float(c["mlp_ratio"]):
        raise ValueError(
            f"diffusers config key 'mlp_ratio': {c['mlp_ratio']} × {hidden} is not a whole width"
        )
    theta = float(c["rope_theta"])
    return {
        "in_channels": int(c["in_channels"]),
        "patch_size": [int(c["patch_size_t"]), int(c["patch_size"]), int(c["patch_size"])],
        "hidden_size": hidden,
        "depth": int(c["num_layers"]),
        "num_heads": heads,
        "mlp_hidden_size": mlp_hidden,
        "text_encoder": "precomputed",
        "text_dim": int(c["text_embed_dim"]),
        "qk_norm": True,
        "prediction": "velocity",
        "rope": {"bands": [0, *(d // 2 for d in axes)], "theta": [theta] * 4, "pair_layout": "interleaved"},
    }


def config_value(cfg: Any, key: str) -> Any:
    """``cfg[key]`` of a dict, ``cfg.key`` of a dataclass or OmegaConf node."""
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def diffusers_shared_keys(model_cfg: Any, name: str) -> dict[str, Any]:
    """The config.json keys :func:`shared_keys` reads, from a ``model`` section; ``name`` the family
    in its errors."""
    rope = config_value(model_cfg, "rope")
    pt, ph, pw = (int(p) for p in config_value(model_cfg, "patch_size"))
    if ph != pw:
        raise ValueError(f"model.patch_size: diffusers' {name} has square patches, got ({ph}, {pw})")
    hidden, heads = int(config_value(model_cfg, "hidden_size")), int(config_value(model_cfg, "num_heads"))
    head_dim = hidden // heads
    bands = [int(b) for b in config_value(rope, "bands")]
    theta = [float(t) for t in config_value(rope, "theta")]
    if bands[0] != 0 or 2 * sum(bands) != head_dim:
        raise ValueError(
            f"model.rope.bands {bands}: diffusers rotates (t, h, w) over the whole head dim {head_dim}"
        )
    if len(set(theta[1:])) != 1:
        raise ValueError(f"model.rope.theta {theta}: diffusers has one rope_theta for t, h and w")
    if config_value(rope, "pair_layout") != "interleaved":
        raise ValueError(f"model.rope.pair_layout: diffusers' {name} pairs are interleaved")
    if not bool(config_value(model_cfg, "qk_norm")):
        raise ValueError(f"model.qk_norm: diffusers' {name} normalises q and k (rms_norm)")
    return {
        "in_channels": int(config_value(model_cfg, "in_channels")),
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": int(config_value(model_cfg, "depth")),
        "mlp_ratio": int(config_value(model_cfg, "mlp_hidden_size")) / hidden,
        "patch_size": ph,
        "patch_size_t": pt,
        "qk_norm": "rms_norm",
        "text_embed_dim": int(config_value(model_cfg, "text_dim")),
        "rope_theta": theta[1],
        "rope_axes_dim": [2 * b for b in bands[1:]],
    }

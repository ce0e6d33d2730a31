"""Wan 2.1 (text- and image-to-video) as an imontage model family; weights load from diffusers by name."""

from imontage.models.wan.model import WanTransformer, build_wan

__all__ = ["WanTransformer", "build_wan"]

"""HunyuanVideo (diffusers' ``HunyuanVideoTransformer3DModel``) as an imontage model family."""

from imontage.models.hunyuan_video.model import HunyuanVideoTransformer, build_hunyuan_video

__all__ = ["HunyuanVideoTransformer", "build_hunyuan_video"]

"""HunyuanVideo 1.5 (text- and image-to-video), diffusers' ``HunyuanVideo15Transformer3DModel``."""

"""Keys of the HunyuanVideo 1.5 family that the shared ``model`` section does not hold (``model.hunyuan_video_15``).

The shared keys carry the rest: ``hidden_size`` = heads × head_dim, ``depth`` = its dual-stream
layers (it has no single-stream ones), ``mlp_hidden_size`` = mlp_ratio × hidden_size,
``text_dim`` = the Qwen2.5-VL text width (3584).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HunyuanVideo15Config:
    out_channels: int = 32  # latent channels predicted (the input adds 32 condition + 1 mask channels)
    num_refiner_layers: int = 2  # blocks of the Qwen text token refiner
    text_embed_2_dim: int = 1472  # width of the glyph-text (ByT5) embeddings, text segments of encoder 1
    image_embed_dim: int = 1152  # width of the condition image's SigLIP tokens (Sample.image_embeds)
    # "i2v": samples carry the condition image's tokens and latent; "t2v": neither (zeros, as the
    # T2V pipeline feeds). The weights are the same modules either way.
    task_type: str = "i2v"
    target_size: int = 640  # the pipeline's resolution in pixels (config.json only: the model ignores it)

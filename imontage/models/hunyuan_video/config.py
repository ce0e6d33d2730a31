"""Keys of the HunyuanVideo family that the shared ``model`` section does not hold (``model.hunyuan_video``).

The shared keys carry the rest: ``hidden_size`` = heads × head_dim, ``depth`` = dual-stream
layers, ``mlp_hidden_size`` = mlp_ratio × hidden_size, ``text_dim`` = the LLM text width (4096).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HunyuanVideoConfig:
    out_channels: int = 16  # latent channels predicted (the I2V latent-concat input has 33)
    num_single_layers: int = 40  # single-stream blocks after the `depth` dual-stream ones
    num_refiner_layers: int = 2  # blocks of the text token refiner
    pooled_projection_dim: int = 768  # width of the pooled CLIP text vector (per sample)
    guidance_embeds: bool = True  # a distilled-guidance embedding joins the timestep's
    # "": text-to-video; "latent_concat": condition latent + mask joined as channels;
    # "token_replace": first-frame tokens clean, modulated with timestep 0.
    image_condition_type: str = ""

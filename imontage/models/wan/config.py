"""Keys of the Wan family (Wan 2.1 and 2.2) that the shared ``model`` section does not hold (``model.wan``).

The shared keys carry the rest: ``hidden_size`` = heads × head_dim, ``depth`` = layers,
``mlp_hidden_size`` = the FFN width, ``text_dim`` = the text encoder's width (UMT5-XXL: 4096).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WanConfig:
    out_channels: int = 16  # latent channels predicted (the input may have more: I2V's 36)
    freq_dim: int = 256  # sinusoidal timestep features
    eps: float = 1e-6  # norm epsilon
    cross_attn_norm: bool = True  # LayerNorm before cross-attention
    image_dim: int = 0  # I2V: width of the CLIP image tokens (1280); 0: text-to-video
    added_kv_proj_dim: int = 0  # I2V: cross-attention's extra key/value projections for image tokens
    # The public pipeline zero-pads every prompt's embeddings to 512 tokens and attends to all of
    # them; the model pads each sample's text to this length the same way (0: no padding).
    text_len: int = 512
    rope_max_seq_len: int = 1024  # kept for the diffusers config round trip
    # Wan 2.2 A14B: one of two experts switched at timestep boundary_ratio·1000 (the pipeline's
    # model_index.json): `transformer` denoises t >= the boundary (high noise), `transformer_2` the
    # rest. 0: a single model, used at every timestep.
    boundary_ratio: float = 0.0
    # Wan 2.2 TI2V: image-to-video keeps each target video's first latent frame clean at timestep 0
    # (the pipelines' expand_timesteps, per-token timesteps); false trains text-to-video.
    expand_timesteps: bool = False

"""HunyuanVideo 1.5 (diffusers' ``HunyuanVideo15Transformer3DModel``) over imontage's packed batches.

Single-device code; parameter names and shapes are diffusers' state_dict keys. It is HunyuanVideo's
dual-stream design (:mod:`imontage.models.common.dual_stream`, whose blocks, text refiner, output
layer and stream plumbing it uses) with:
  modulation by the timestep alone (no pooled text, no guidance embedding): the blocks take
  T(t_token) on visual rows and T(t_s) on text rows, the output layer T(t_s) on clean conditions;
  a text stream of three kinds of rows per sample, each with its ``cond_type_embed`` row added:
  Qwen2.5-VL text through the token refiner (0), glyph text (ByT5, text segments of encoder 1)
  through an MLP (1), and the condition image's SigLIP tokens (``Sample.image_embeds``) through an
  MLP (2); a sample whose image tokens are all zero has none (the T2V pipeline feeds zeros);
  only dual-stream blocks.
I2V's condition latent and first-frame mask are the ``latent_concat`` channel condition; T2V has
none and reads zeros in those channels, as the T2V pipeline feeds them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imontage.models.common.dual_stream import (
    DualStreamBlock,
    DualStreamTransformer,
    OutputNorm,
    PatchEmbed,
    TextRefiner,
    TimestepEmbedding,
    stream_timesteps,
)
from imontage.models.common.rope import MultiAxisRope
from imontage.models.common.sequence import PackedBatch
from imontage.models.common.token_layout import SampleTokenLayout

GLYPH_HIDDEN = 2048  # diffusers' ByT5 projection's inner width, whatever the model's
TASK_TYPES = ("t2v", "i2v")
QWEN, GLYPH, IMAGE = 0, 1, 2  # rows of cond_type_embed: the kinds of text-stream rows


class ImageProjection(nn.Module):
    """diffusers' ``HunyuanVideo15ImageProjection``: SigLIP tokens ``[n, E]`` -> ``[n, d]``."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, in_features)
        self.linear_2 = nn.Linear(in_features, hidden_size)
        self.norm_out = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(F.gelu(self.linear_1(self.norm_in(x)))))


class GlyphTextProjection(nn.Module):
    """diffusers' ``HunyuanVideo15ByT5TextProjection``: glyph-text rows ``[n, E2]`` -> ``[n, d]``."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, GLYPH_HIDDEN)
        self.linear_2 = nn.Linear(GLYPH_HIDDEN, GLYPH_HIDDEN)
        self.linear_3 = nn.Linear(GLYPH_HIDDEN, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_3(F.gelu(self.linear_2(F.gelu(self.linear_1(self.norm(x))))))


class HunyuanVideo15Transformer(DualStreamTransformer):
    """HunyuanVideo 1.5's transformer over packed multi-segment samples (see the module docstring)."""

    def __init__(self, cfg: Any) -> None:
        """``cfg``: a :class:`~imontage.config.schema.ModelConfig` with ``family: hunyuan_video_15``."""
        super().__init__()
        hv = cfg.hunyuan_video_15
        if str(cfg.prediction) != "velocity":
            raise ValueError(f"model.prediction={cfg.prediction}: HunyuanVideo 1.5 predicts the velocity")
        if str(hv.task_type) not in TASK_TYPES:
            raise ValueError(f"model.hunyuan_video_15.task_type '{hv.task_type}' is not one of {TASK_TYPES}")
        self.patch_size = tuple(int(p) for p in cfg.patch_size)  # type: ignore[assignment]
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(hv.out_channels)
        self.text_dims = (int(cfg.text_dim), int(hv.text_embed_2_dim))  # of encoder 0 (Qwen), 1 (ByT5)
        hidden, heads = int(cfg.hidden_size), int(cfg.num_heads)
        mlp, qk_norm = int(cfg.mlp_hidden_size), bool(cfg.qk_norm)
        self.backend = str(cfg.attention_backend)

        self.x_embedder = PatchEmbed(self.in_channels, hidden, self.patch_size)
        self.image_embedder = ImageProjection(int(hv.image_embed_dim), hidden)
        self.context_embedder = TextRefiner(
            self.text_dims[0], hidden, heads, int(hv.num_refiner_layers), self.backend
        )
        self.context_embedder_2 = GlyphTextProjection(self.text_dims[1], hidden)
        self.time_embed = TimestepEmbedding(hidden)
        self.cond_type_embed = nn.Embedding(3, hidden)
        self.rope = MultiAxisRope(cfg.rope.bands, cfg.rope.theta, str(cfg.rope.pair_layout))
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(hidden, heads, mlp, qk_norm, self.backend) for _ in range(int(cfg.depth))
        )
        self.norm_out = OutputNorm(hidden)
        self.proj_out = nn.Linear(hidden, self.out_channels * math.prod(self.patch_size))
        self.token_layout = SampleTokenLayout()

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer_blocks)

    def text_rows(self, batch: PackedBatch, encoder: int) -> torch.Tensor:
        """The embeddings ``[n, E]`` of the text rows of ``encoder`` (0: Qwen2.5-VL, 1: ByT5)."""
        rows = (
            batch.is_text if batch.text_encoder is None else batch.is_text & (batch.text_encoder == encoder)
        )
        width, dtype = self.text_dims[encoder], self.x_embedder.proj.weight.dtype
        if batch.text_embeds is None:
            if bool(rows.any()):
                raise ValueError(
                    "HunyuanVideo 1.5 reads precomputed text embeddings: text segments carry data [L, E]"
                )
            return self.x_embedder.proj.weight.new_zeros(0, width)
        if batch.text_embeds.shape[1] < width:
            raise ValueError(
                f"text embeddings {batch.text_embeds.shape[1]} wide; encoder {encoder}'s are {width} wide"
            )
        return batch.text_embeds[rows, :width].to(dtype)

    def text_stream(
        self, batch: PackedBatch, owner: torch.Tensor, sample_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text stream ``[Nt, d]``, whole, and each row's sample ``[Nt]`` (sorted): per sample its
        image tokens, glyph text, then Qwen text (diffusers' order)."""
        if batch.text_encoder is not None and bool((batch.text_encoder[batch.is_text] > GLYPH).any()):
            raise ValueError("HunyuanVideo 1.5 has text encoders 0 (Qwen2.5-VL) and 1 (ByT5), no other")
        encoders = torch.zeros_like(owner) if batch.text_encoder is None else batch.text_encoder
        qwen_owner = owner[batch.is_text & (encoders == QWEN)]
        glyph_owner = owner[batch.is_text & (encoders == GLYPH)]
        # Every module runs, on no rows if need be: under ZeRO-3 every rank enters the same ones.
        qwen = self.context_embedder(self.text_rows(batch, QWEN), qwen_owner, sample_t, self.backend)
        glyph = self.context_embedder_2(self.text_rows(batch, GLYPH))
        dtype = qwen.dtype
        if batch.image_embeds is None:
            images = qwen.new_zeros(0, 1, self.image_embedder.norm_in.normalized_shape[0])
        else:
            images = batch.image_embeds.to(dtype)
        shown = images.flatten(1).ne(0).any(1)  # [B]: samples with a condition image (T2V's are zeros)
        image = self.image_embedder(images[shown]).flatten(0, 1)  # [b·L, d]
        image_owner = torch.arange(images.shape[0], device=owner.device)[shown].repeat_interleave(
            images.shape[1]
        )
        rows = torch.cat([image, glyph, qwen])
        kinds = torch.cat(
            [
                torch.full((len(part),), kind, device=owner.device)
                for part, kind in ((image, IMAGE), (glyph, GLYPH), (qwen, QWEN))
            ]
        )
        rows = rows + self.cond_type_embed(kinds)
        sample = torch.cat([image_owner, glyph_owner, qwen_owner])
        order = torch.argsort(sample, stable=True)
        return rows[order], sample[order]

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """``[N, out_channels·pt·ph·pw]`` velocity ε − x0 per token, features (C, pt, ph, pw); text rows 0."""
        owner = batch.sample_index()
        times = stream_timesteps(batch, owner)
        n, samples = owner.shape[0], batch.num_samples
        # One table of distinct timesteps for the blocks' rows, the output layer's and the text's.
        distinct, inverse = torch.unique(
            torch.cat([times.block, times.final, times.sample]), return_inverse=True
        )
        table = self.time_embed.timestep(distinct)  # [U, d]
        txt, txt_owner = self.text_stream(batch, owner, times.sample)
        visual = ~batch.is_text
        return self.run_streams(
            batch,
            owner,
            txt,
            torch.bincount(txt_owner, minlength=samples),
            table,
            torch.cat([inverse[2 * n :][txt_owner], inverse[:n][visual]]),
            inverse[n : 2 * n][visual],
        )


def build_hunyuan_video_15(cfg: Any, device: torch.device | str | None = None) -> HunyuanVideo15Transformer:
    """Build HunyuanVideo 1.5's transformer; ``device="meta"`` builds its shapes only (8.3B: 33 GB in fp32)."""
    with torch.device(device or "cpu"):
        return HunyuanVideo15Transformer(cfg)

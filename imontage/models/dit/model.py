"""The diffusion transformer: packed segments in, a velocity per visual token out.

Single-device code: nothing here knows of process groups. ``imontage/parallel`` wraps it.

Sequence of a forward pass over a :class:`PackedBatch` of N tokens:
  visual rows: patch features ``[N, C·pt·ph·pw]`` -> Linear (a 3D patch embedding with
  stride = kernel); text rows: byte ids (or precomputed embeddings) -> text projection;
  per-token timestep embedding -> shared adaLN modulation ``[N, 6, d]``;
  blocks: adaLN-zero, QK-RMSNorm, multi-axis RoPE, block-diagonal joint attention, GELU MLP;
  final adaLN + Linear back to ``[N, C·pt·ph·pw]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imontage.models.common.attention import CoreAttention
from imontage.models.common.embeddings import FREQUENCY_DIM, timestep_frequencies
from imontage.models.common.rope import MultiAxisRope
from imontage.models.common.sequence import BYTE_VOCAB, PackedBatch
from imontage.models.common.token_layout import TokenLayout


class ByteTextEncoder(nn.Module):
    """The built-in text encoder: learned embeddings of UTF-8 bytes and of their index in the text.

    Text tokens sit at the RoPE origin in most layouts, so word order comes from the index embedding.
    """

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.byte_embedding = nn.Embedding(BYTE_VOCAB, dim)
        self.index_embedding = nn.Embedding(max_len, dim)

    def forward(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.byte_embedding(ids) + self.index_embedding(index)  # [N, dim]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FREQUENCY_DIM, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(timestep_frequencies(t).to(self.fc1.weight.dtype))))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-zero transformer block with QK-RMSNorm, multi-axis RoPE and joint attention.

    The per-token modulation ``[N, 6, d]`` comes from the model's shared projection; each block
    adds its own learned offset, so a block costs no extra d×6d matrix.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_hidden_size: int,
        rope: MultiAxisRope,
        qk_norm: bool,
        backend: str,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.core_attention = CoreAttention(backend)
        self.modulation = nn.Parameter(torch.zeros(6, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # output rows ordered (q|k|v, head, head_dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.rope = rope
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def attention(
        self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, bounds: tuple[int, ...]
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # [n, 3·h·Dh]: h = H on one device, H/TP under tensor parallelism
        n = qkv.shape[0]  # under sequence parallelism qkv gathers the shards, so n may exceed x's rows
        q, k, v = qkv.view(n, 3, -1, self.head_dim).unbind(1)  # [n, h, Dh] each
        if isinstance(self.q_norm, nn.RMSNorm) and isinstance(self.k_norm, nn.RMSNorm):
            q, k = self.rope.normed(q, k, positions, self.q_norm, self.k_norm)  # one fused launch on GPU
        else:
            q, k = self.rope(self.q_norm(q), self.k_norm(k), positions)
        out = self.core_attention(q, k, v, cu_seqlens, bounds)
        return self.proj(out.reshape(n, -1))

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        bounds: tuple[int, ...],
    ) -> torch.Tensor:
        """``bounds``: ``cu_seqlens`` as Python ints, read once per forward pass rather than per block."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (modulation + self.modulation).unbind(1)  # [N, d] each
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1), positions, cu_seqlens, bounds)
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate="tanh"))
        return x + gate2 * h


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, out_features)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(t_emb)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over packed multi-segment samples (see the module docstring)."""

    def __init__(self, cfg: Any) -> None:
        """``cfg``: a :class:`~imontage.config.schema.ModelConfig`, as a dataclass or an OmegaConf node."""
        super().__init__()
        c = cfg
        self.patch_size = tuple(int(p) for p in c.patch_size)
        self.in_channels = int(c.in_channels)
        hidden = int(c.hidden_size)
        self.hidden_size = hidden
        patch_dim = self.in_channels * math.prod(self.patch_size)
        self.text_encoder_kind = str(c.text_encoder)
        text_dim = int(c.text_dim)
        self.gradient_checkpointing = False
        self.prediction = str(c.prediction)
        self.min_timestep = float(c.min_timestep)

        self.patch_embed = nn.Linear(patch_dim, hidden)
        self.text_encoder = (
            ByteTextEncoder(text_dim, int(c.max_text_len)) if self.text_encoder_kind == "byte" else None
        )
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden)
        )
        self.time_embed = TimestepEmbedder(hidden)
        self.time_modulation = nn.Linear(hidden, 6 * hidden)
        rope = MultiAxisRope(c.rope.bands, c.rope.theta, str(c.rope.pair_layout))
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden,
                int(c.num_heads),
                int(c.mlp_hidden_size),
                rope,
                bool(c.qk_norm),
                str(c.attention_backend),
            )
            for _ in range(int(c.depth))
        )
        self.final = FinalLayer(hidden, patch_dim)
        self.token_layout = TokenLayout()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, normal embeddings; adaLN and output zeroed so every block starts as identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for mlp_layer in (self.time_embed.fc1, self.time_embed.fc2):
            nn.init.normal_(mlp_layer.weight, std=0.02)
        for zeroed in (self.time_modulation, self.final.modulation, self.final.linear):
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)

    def embed_text(self, batch: PackedBatch) -> torch.Tensor:
        if batch.text_embeds is not None:
            features = batch.text_embeds
        elif self.text_encoder is not None:
            features = self.text_encoder(batch.text_ids, batch.text_index)
        elif not bool(batch.is_text.any()):  # no text rows: zeros keep the projection in the graph
            text_dim = int(self.text_proj[0].in_features)  # type: ignore[arg-type]
            features = batch.tokens.new_zeros(batch.tokens.shape[0], text_dim)
        else:
            raise ValueError("text_encoder=precomputed: text segments must carry embeddings, not strings")
        return self.text_proj(features.to(self.patch_embed.weight.dtype))

    def embed(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token features ``[n, d]``, timestep embedding ``[n, d]`` and adaLN modulation ``[n, 6, d]``."""
        x = self.patch_embed(batch.tokens.to(self.patch_embed.weight.dtype))  # [n, d]
        # Always run the text path, even with no text row: under ZeRO-3 every rank must enter the
        # same modules, or their parameter gathers would wait for each other forever.
        x = torch.where(batch.is_text[:, None], self.embed_text(batch), x)
        t_emb = self.time_embed(batch.timesteps)  # [n, d]
        modulation = self.time_modulation(F.silu(t_emb)).view(-1, 6, self.hidden_size)  # [n, 6, d]
        return x, t_emb, modulation

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """``[N, C·pt·ph·pw]`` velocity ε − x0 for every token (only target rows are meaningful)."""
        layout = self.token_layout
        local = layout.shard_batch(batch)
        x, t_emb, modulation = self.embed(local)
        x, modulation = layout.enter_blocks(x, modulation)
        bounds = tuple(local.cu_seqlens.tolist())  # one host read for every block
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(
                    block, x, modulation, local.positions, local.cu_seqlens, bounds, use_reentrant=False
                )
            else:
                x = block(x, modulation, local.positions, local.cu_seqlens, bounds)
        out = layout.gather_output(self.final(layout.exit_blocks(x), t_emb), batch)
        if self.prediction == "data":  # out is x0: x_t = (1 − t)·x0 + t·ε gives ε − x0 = (x_t − x0) / t
            t = batch.timesteps.clamp(min=self.min_timestep)[:, None]
            out = (batch.tokens.to(out.dtype) - out) / t
        return out


def build_dit(cfg: Any, device: torch.device | str | None = None) -> DiT:
    """Build a DiT; ``device="meta"`` builds its shapes only (to count a 14B model's parameters)."""
    with torch.device(device or "cpu"):
        return DiT(cfg)

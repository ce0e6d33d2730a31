"""The Wan 2.1 transformer (text-to-video and image-to-video) over imontage's packed batches.

Single-device code. Parameter names and shapes equal diffusers' ``WanTransformer3DModel``
``state_dict()`` keys, so a diffusers checkpoint loads by name (``load_state_dict(strict=True)``).

A forward pass over a :class:`PackedBatch` of N rows:
  visual rows (``~is_text``) -> patch features ``[n, (C+C')·pt·ph·pw]`` (latent | channel condition)
  -> ``patch_embedding`` (the Conv3d weight used as a linear over patch rows);
  per-token timestep 1000·t -> ``time_embedder`` ``[n, d]`` -> ``time_proj`` ``[n, 6, d]``;
  each sample's text rows, zero-padded to ``text_len`` -> ``text_embedder``: the cross-attention
  context; I2V: CLIP image tokens -> ``image_embedder``: a second context with its own k/v;
  blocks: self-attention (block-diagonal over the visual rows, RMSNorm across heads, interleaved
  3D RoPE), cross-attention, GELU FFN, each modulated as diffusers' ``WanTransformerBlock``;
  ``norm_out`` + ``proj_out`` -> rows reordered from (pt, ph, pw, C) to imontage's (C, pt, ph, pw).
Text rows output zeros. Parallelism enters only through ``model.token_layout`` (a
:class:`SampleTokenLayout`): it shards the visual rows, and says which sample each local row is of,
for the cross-attention's query packing; the text context stays whole. Norms and modulation run in fp32, as diffusers keeps them. Wan predicts the
velocity itself: ``model.prediction`` (a DiT option) does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imontage.models.common.attention import CoreAttention, varlen_attention
from imontage.models.common.embeddings import timestep_frequencies
from imontage.models.common.feed_forward import FeedForward
from imontage.models.common.rope import MultiAxisRope
from imontage.models.common.sequence import PackedBatch
from imontage.models.common.token_layout import SampleTokenLayout, select_rows, sequence_bounds


@dataclass
class Packing:
    """One packed key/value (or query) sequence: ``cu_seqlens`` and its host copy."""

    cu_seqlens: torch.Tensor  # [B + 1] int32
    bounds: tuple[int, ...]

    @property
    def max_seqlen(self) -> int:
        return max((b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)), default=0)

    def with_sequences(self, count: int) -> Packing:
        """The same packing with empty sequences appended up to ``count`` (for padding samples)."""
        extra = count - (len(self.bounds) - 1)
        if extra <= 0:
            return self
        tail = self.cu_seqlens[-1:].expand(extra)
        return Packing(torch.cat([self.cu_seqlens, tail]), self.bounds + (self.bounds[-1],) * extra)


@dataclass
class CrossContext:
    """What the cross-attention attends to: text (and I2V image) tokens, packed per sample."""

    text: torch.Tensor  # [M, d]
    text_packing: Packing
    image: torch.Tensor | None = None  # [B·L_img, d]
    image_packing: Packing | None = None

    def with_samples(self, count: int) -> CrossContext:
        """This context for ``count`` query sequences: padding samples past the batch's get no key."""
        image_packing = None if self.image_packing is None else self.image_packing.with_sequences(count)
        return CrossContext(self.text, self.text_packing.with_sequences(count), self.image, image_packing)


def layer_norm_fp32(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """diffusers' ``FP32LayerNorm``: the norm in fp32 whatever the parameters' dtype (returns fp32)."""
    if isinstance(norm, nn.Identity):
        return x.float()
    assert isinstance(norm, nn.LayerNorm)
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


class TwoLayerMlp(nn.Module):
    """``linear_1``, activation, ``linear_2`` (diffusers' ``TimestepEmbedding`` and text projection)."""

    def __init__(self, dim_in: int, dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = activation
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ImageEmbedder(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, GELU MLP, LayerNorm (diffusers' ``WanImageEmbedding``)."""

    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.ff = FeedForward(image_dim, image_dim, dim, "gelu")
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = layer_norm_fp32(x, self.norm1).to(dtype)
        return layer_norm_fp32(self.ff(x), self.norm2).to(dtype)


class ConditionEmbedder(nn.Module):
    """Timestep, text and (I2V) image embeddings (diffusers' ``WanTimeTextImageEmbedding``)."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TwoLayerMlp(freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TwoLayerMlp(text_dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = ImageEmbedder(image_dim, dim) if image_dim else None

    def time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t in [0, 1] ``[u]`` -> embedding ``[u, d]`` and block modulation ``[u, 6, d]``.

        Wan's timestep is 1000·t; :func:`timestep_frequencies` scales by 1000 itself and orders
        (cos, sin) as diffusers' ``Timesteps(flip_sin_to_cos=True)``.
        """
        weight = self.time_embedder.linear_1.weight
        temb = self.time_embedder(timestep_frequencies(t, self.freq_dim).to(weight.dtype))  # [u, d]
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class WanAttention(nn.Module):
    """Self- or cross-attention of a Wan block; q/k RMSNorm spans all heads (weight ``[H·Dh]``)."""

    def __init__(self, dim: int, num_heads: int, eps: float, added_kv_proj_dim: int, backend: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # [1]: diffusers' dropout
        # Across all heads (not per head): the fused per-head QK-norm path does not apply, and under
        # tensor parallelism the sum of squares would need a reduction over the TP group.
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim:  # I2V: the image tokens' own keys and values
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        self.core_attention = CoreAttention(backend)  # self-attention: a module Ulysses can wrap

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [n, d] -> [n, H, Dh]

    def self_attention(
        self, x: torch.Tensor, positions: torch.Tensor, rope: MultiAxisRope, packing: Packing
    ) -> torch.Tensor:
        """``[n, d]`` visual rows attend to their own sample's visual rows; returns ``[n, d]``."""
        # num_heads: this rank's heads under tensor parallelism (to_q's output columns are theirs)
        q = self.heads(self.norm_q(self.to_q(x)))  # norm across heads before the split
        k = self.heads(self.norm_k(self.to_k(x)))
        q, k = rope(q, k, positions)
        out = self.core_attention(q, k, self.heads(self.to_v(x)), packing.cu_seqlens, packing.bounds)
        return self.to_out[0](out.flatten(1).type_as(x))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query: Packing, key: Packing
    ) -> torch.Tensor:
        out = varlen_attention(
            q,
            k,
            v,
            query.cu_seqlens,
            query.max_seqlen,
            self.backend,
            query.bounds,
            cu_seqlens_k=key.cu_seqlens,
            max_seqlen_k=key.max_seqlen,
            bounds_k=key.bounds,
        )
        return out.flatten(1).type_as(q)  # [n, d]

    def cross_attention(self, x: torch.Tensor, context: CrossContext, query: Packing) -> torch.Tensor:
        """``[n, d]`` visual rows attend to their sample's text (plus, I2V, image) tokens."""
        q = self.heads(self.norm_q(self.to_q(x)))
        k = self.heads(self.norm_k(self.to_k(context.text)))
        out = self._attend(q, k, self.heads(self.to_v(context.text)), query, context.text_packing)
        if context.image is not None and context.image_packing is not None:
            k_img = self.heads(self.norm_added_k(self.add_k_proj(context.image)))
            v_img = self.heads(self.add_v_proj(context.image))
            out = out + self._attend(q, k_img, v_img, query, context.image_packing)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """Modulated self-attention, cross-attention and FFN (diffusers' ``WanTransformerBlock``)."""

    def __init__(self, cfg: Any, rope: MultiAxisRope) -> None:
        super().__init__()
        dim, wan = int(cfg.hidden_size), cfg.wan
        heads, eps, backend = int(cfg.num_heads), float(wan.eps), str(cfg.attention_backend)
        self.rope = rope
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, eps, 0, backend)
        self.attn2 = WanAttention(dim, heads, eps, int(wan.added_kv_proj_dim), backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps) if bool(wan.cross_attn_norm) else nn.Identity()
        self.ffn = FeedForward(dim, int(cfg.mlp_hidden_size), dim, "gelu_tanh")
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        positions: torch.Tensor,
        packing: Packing,
        query: Packing,
        context: CrossContext,
    ) -> torch.Tensor:
        """``x`` ``[n, d]`` visual rows, ``modulation`` ``[n, 6, d]`` (or ``[1, 6, d]``, broadcast over
        the rows when they share one timestep); returns ``[n, d]``.

        ``packing``: the self-attention's (the whole packed visual sequence); ``query``: the
        cross-attention queries' (the rows this rank's queries hold, by sample).
        """
        dtype = x.dtype
        table = (self.scale_shift_table + modulation.float()).unbind(1)  # 6 × [n or 1, d], fp32
        shift1, scale1, gate1, shift2, scale2, gate2 = table
        h = (layer_norm_fp32(x, self.norm1) * (1 + scale1) + shift1).to(dtype)
        x = (x.float() + self.attn1.self_attention(h, positions, self.rope, packing) * gate1).to(dtype)
        h = layer_norm_fp32(x, self.norm2).to(dtype)
        x = x + self.attn2.cross_attention(h, context, query)
        h = (layer_norm_fp32(x, self.norm3) * (1 + scale2) + shift2).to(dtype)
        return (x.float() + self.ffn(h).float() * gate2).to(dtype)


class WanTransformer(nn.Module):
    """Wan 2.1 over packed batches (see the module docstring); names follow diffusers' model."""

    def __init__(self, cfg: Any) -> None:
        """``cfg``: a :class:`~imontage.config.schema.ModelConfig` with ``family: wan``."""
        super().__init__()
        wan = cfg.wan
        dim = int(cfg.hidden_size)
        pt, ph, pw = (int(p) for p in cfg.patch_size)
        self.patch_size = (pt, ph, pw)
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(wan.out_channels)
        self.text_len = int(wan.text_len)
        self.hidden_size = dim
        self.gradient_checkpointing = False
        self.patch_embedding = nn.Conv3d(self.in_channels, dim, self.patch_size, stride=self.patch_size)
        self.condition_embedder = ConditionEmbedder(
            dim, int(wan.freq_dim), int(cfg.text_dim), int(wan.image_dim)
        )
        self.rope = MultiAxisRope(cfg.rope.bands, cfg.rope.theta, str(cfg.rope.pair_layout))
        self.blocks = nn.ModuleList(WanBlock(cfg, self.rope) for _ in range(int(cfg.depth)))
        self.norm_out = nn.LayerNorm(dim, eps=float(wan.eps), elementwise_affine=False)
        self.proj_out = nn.Linear(dim, self.out_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.token_layout = SampleTokenLayout()

    def embed_patches(self, batch: PackedBatch) -> torch.Tensor:
        """Visual rows' features joined with their channel condition, ``[n, in_channels·p]`` -> ``[n, d]``.

        Features are ordered (C, pt, ph, pw) on both sides, so ``[latent | condition]`` rows are the
        patches of the channel concatenation diffusers' I2V pipeline feeds (latents | mask + image).
        """
        weight = self.patch_embedding.weight  # [d, C_in, pt, ph, pw]
        features = batch.tokens  # ``batch``: visual rows only (:func:`select_rows`)
        if batch.channel_condition is not None:
            features = torch.cat([features, batch.channel_condition], dim=1)
        if features.shape[1] != weight[0].numel():
            raise ValueError(
                f"visual rows carry {features.shape[1]} features, the patch embedding takes "
                f"{weight[0].numel()} ({self.in_channels} channels × {self.patch_size}): "
                "in_channels counts the channel condition too"
            )
        return F.linear(features.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)

    def embed_context(self, batch: PackedBatch, sample: torch.Tensor) -> CrossContext:
        """Each sample's text rows in order, zero-padded to ``text_len``, and its image tokens."""
        text_dim = self.condition_embedder.text_embedder.linear_1.in_features
        dtype = self.patch_embedding.weight.dtype
        num_samples = batch.num_samples
        rows = batch.is_text.nonzero().squeeze(1)
        if batch.text_embeds is not None:
            text = batch.text_embeds[rows].to(dtype)  # [m, E]
        elif rows.numel():
            raise ValueError("Wan reads precomputed text embeddings: text segments must carry data [L, E]")
        else:
            text = batch.tokens.new_zeros(0, text_dim, dtype=dtype)
        owner = sample[rows]  # [m] sample of each text row (sorted)
        counts = torch.bincount(owner, minlength=num_samples)  # [B]
        if self.text_len:
            longest = int(counts.max().item()) if num_samples else 0
            if longest > self.text_len:
                raise ValueError(
                    f"a sample has {longest} text tokens, more than model.wan.text_len={self.text_len}"
                )
            rank = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[owner]
            padded = text.new_zeros(num_samples, self.text_len, text.shape[1])
            padded[owner, rank] = text
            text = padded.flatten(0, 1)  # [B·text_len, E]
            counts = torch.full_like(counts, self.text_len)
        embedder = self.condition_embedder
        context = CrossContext(embedder.text_embedder(text), Packing(*sequence_bounds(counts)))
        if embedder.image_embedder is not None:
            if batch.image_embeds is None:
                raise ValueError("an image-to-video Wan model needs the batch's image_embeds [B, L, E]")
            images = embedder.image_embedder(batch.image_embeds.to(dtype))  # [B, L_img, d]
            lengths = torch.full((num_samples,), images.shape[1], device=images.device)
            context.image, context.image_packing = images.flatten(0, 1), Packing(*sequence_bounds(lengths))
        return context

    def head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` -> ``[n, C·pt·ph·pw]`` in imontage's feature order (proj_out's is (pt, ph, pw, C)).

        ``temb``: ``[n, d]``, or ``[1, d]`` when the rows share one timestep."""
        shift, scale = (self.scale_shift_table + temb.float()[:, None]).unbind(1)  # [n or 1, d] each
        x = (layer_norm_fp32(x, self.norm_out) * (1 + scale) + shift).type_as(x)
        out = self.proj_out(x).unflatten(1, (*self.patch_size, self.out_channels))  # [n, pt, ph, pw, C]
        return out.permute(0, 4, 1, 2, 3).flatten(1)

    def time_rows(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row t ``[n]`` -> embedding ``[n, d]`` and modulation ``[n, 6, d]``, each computed once per
        distinct timestep; ``[1, d]`` and ``[1, 6, d]`` when all rows share one (Wan 2.1 trains one
        per sample), which the blocks broadcast as diffusers does its per-sample embedding: no
        time-embedding matmuls over n rows, no ``[n, 6, d]`` table per block."""
        times, index = torch.unique(t, return_inverse=True)  # [u] sorted, [n]
        temb, modulation = self.condition_embedder.time(times)  # [u, d], [u, 6, d]
        if times.numel() == 1:
            return temb, modulation
        return temb[index], modulation[index]

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """``[N, out_channels·pt·ph·pw]`` velocity ε − x0 per row; text rows are zero."""
        layout = self.token_layout
        visual = ~batch.is_text
        sample = batch.sample_index()  # [N]
        rows = select_rows(batch, visual, sample)  # n visual rows, packed per sample
        local = layout.shard_batch(rows)  # this rank's rows; cu_seqlens: the whole (padded) sequence
        packing = Packing(local.cu_seqlens, tuple(local.cu_seqlens.tolist()))
        owners = layout.local_sample_index(local)
        query = Packing(*sequence_bounds(torch.bincount(owners, minlength=local.num_samples)))
        context = self.embed_context(batch, sample).with_samples(local.num_samples)  # whole on every rank
        x = self.embed_patches(local)  # [n_local, d]
        temb, modulation = self.time_rows(local.timesteps)  # [n_local or 1, d], [n_local or 1, 6, d]
        if modulation.shape[0] == 1:  # a table whole on every rank (under SP its gradient is summed)
            x, modulation = layout.enter_rows(x), layout.enter_table(modulation)
        else:
            x, modulation = layout.enter_blocks(x, modulation)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(
                    block, x, modulation, local.positions, packing, query, context, use_reentrant=False
                )
            else:
                x = block(x, modulation, local.positions, packing, query, context)
        out = layout.gather_output(self.head(layout.exit_blocks(x), temb), rows)  # [n, ·]
        full = out.new_zeros(batch.is_text.shape[0], out.shape[1])
        return full.index_put((visual.nonzero().squeeze(1),), out)


def build_wan(cfg: Any, device: torch.device | str | None = None) -> WanTransformer:
    """Build a Wan 2.1 transformer; ``device="meta"`` builds its shapes only (to count parameters)."""
    with torch.device(device or "cpu"):
        return WanTransformer(cfg)

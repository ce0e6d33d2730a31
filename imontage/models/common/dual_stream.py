"""The dual-stream (MMDiT) transformer of HunyuanVideo-style families, over packed batches.

Single-device building blocks that a family's transformer composes; parameter names and shapes are
diffusers' state_dict keys (``HunyuanVideoTransformer3DModel`` and the models built on its design),
so a diffusers folder loads by name. The visual and text rows stay two streams through every block,
each a packed batch of its own (:func:`select_rows`): dual-stream blocks hold separate weights for
the two streams and attend jointly within each sample (:class:`JointPacking` lays each sample's
rows of both streams together); text rows first pass the token refiner (attention within the
sample's own text); the adaLN output layer modulates each visual row. Parallelism enters only
through ``model.token_layout`` (a :class:`SampleTokenLayout`), which shards each stream.

Modulation is per token (:func:`stream_timesteps`): a sample's denoising timestep t_s is the
largest timestep of its target tokens; text rows take the embedding of t_s, visual rows that of
their own timestep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imontage.models.common.attention import varlen_attention
from imontage.models.common.embeddings import timestep_frequencies
from imontage.models.common.feed_forward import FeedForward
from imontage.models.common.parallel_plan import COLUMNS, ROWS, BlockPlan, TensorSplit, linears
from imontage.models.common.rope import MultiAxisRope
from imontage.models.common.sequence import PackedBatch
from imontage.models.common.token_layout import SampleTokenLayout, select_rows, sequence_bounds, stream_batch

FREQUENCY_DIM = 256
REFINER_MLP_RATIO = 4.0  # diffusers' HunyuanVideoTokenRefiner keeps its default, whatever mlp_ratio is


class MLPEmbedder(nn.Module):
    """Linear, SiLU, linear: diffusers' ``TimestepEmbedding`` and ``PixArtAlphaTextProjection``."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep features through an MLP: diffusers' ``HunyuanVideo15TimeEmbedding``."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(FREQUENCY_DIM, hidden_size)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in [0, 1] (diffusers' timestep / 1000) -> ``[n, d]``."""
        dtype = self.timestep_embedder.linear_1.weight.dtype
        return self.timestep_embedder(timestep_frequencies(t, FREQUENCY_DIM).to(dtype))


class TimestepTextEmbedding(TimestepEmbedding):
    """Sinusoidal timestep (and guidance) features + a pooled text vector, summed: ``[B, d]``."""

    def __init__(self, hidden_size: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__(hidden_size)
        self.text_embedder = MLPEmbedder(pooled_dim, hidden_size)
        self.guidance_embedder = MLPEmbedder(FREQUENCY_DIM, hidden_size) if guidance else None

    def guidance(self, scale: torch.Tensor) -> torch.Tensor:
        """Distilled guidance scale (the pipeline feeds 1000·scale to the sinusoid) -> ``[n, d]``."""
        assert self.guidance_embedder is not None
        dtype = self.guidance_embedder.linear_1.weight.dtype
        return self.guidance_embedder(timestep_frequencies(scale, FREQUENCY_DIM).to(dtype))


class Modulation(nn.Module):
    """SiLU + linear of an embedding table ``[U, d]`` into ``chunks`` vectors, gathered per token."""

    def __init__(self, hidden_size: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(hidden_size, chunks * hidden_size)

    def forward(self, table: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``table`` ``[U, d]`` distinct embeddings, ``index`` ``[n]`` -> ``chunks`` tensors ``[n, d]``."""
        return self.linear(F.silu(table))[index].chunk(self.chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class Attention(nn.Module):
    """diffusers' ``Attention`` layout: q/k/v (and the text stream's ``add_*``) projections, per-head
    RMSNorm of q and k, output projections. What runs is chosen by the block that owns it."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qk_norm: bool,
        backend: str,
        added: bool = False,
        output: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size)]) if output else None
        self.core_attention = JointAttention(backend)  # the blocks' joint attention: Ulysses wraps it
        if added:
            self.add_q_proj = nn.Linear(hidden_size, hidden_size)
            self.add_k_proj = nn.Linear(hidden_size, hidden_size)
            self.add_v_proj = nn.Linear(hidden_size, hidden_size)
            self.to_add_out = nn.Linear(hidden_size, hidden_size)
            self.norm_added_q = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(self.head_dim, eps=1e-6)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)  # [n, H, Dh]

    def qkv(
        self, x: torch.Tensor, rope: MultiAxisRope | None = None, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[n, H, Dh]`` of ``x`` ``[n, d]``: normed, and rotated where ``rope`` is given."""
        q, k, v = (self.heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None and self.norm_k is not None:
            if rope is not None:
                assert positions is not None
                return (*rope.normed(q, k, positions, self.norm_q, self.norm_k), v)
            q, k = self.norm_q(q), self.norm_k(k)
        elif rope is not None:
            assert positions is not None
            q, k = rope(q, k, positions)
        return q, k, v

    def added_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The text stream's q, k, v (dual-stream blocks): normed, never rotated."""
        q, k, v = (self.heads(proj(x)) for proj in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        return self.norm_added_q(q), self.norm_added_k(k), v


class SequenceAttention:
    """Softmax attention within each sequence of ``cu_seqlens`` (block-diagonal), heads flattened."""

    def __init__(self, cu_seqlens: torch.Tensor, backend: str) -> None:
        self.cu_seqlens = cu_seqlens
        self.bounds = tuple(int(b) for b in cu_seqlens.tolist())  # one host read per forward pass
        self.max_seqlen = max(
            (b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)), default=0
        )
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[n, H, Dh]`` q, k, v -> ``[n, H·Dh]``."""
        out = varlen_attention(
            q, k, v, self.cu_seqlens, self.max_seqlen, backend=self.backend, bounds=self.bounds
        )
        return out.flatten(1)


class JointPacking:
    """The visual and text rows of every sample, attended jointly: sample s's sequence is its
    visual rows then its text rows.

    Attention receives the rows of the two streams side by side: on one device all visual rows,
    then all text rows; under Ulysses, after the all-to-all, each context-parallel rank's visual
    shard then its text shard, rank after rank. ``order`` gathers those rows into per-sample
    sequences for :func:`varlen_attention`; ``inverse`` puts the output back.
    """

    def __init__(self, visual: torch.Tensor, text: torch.Tensor, shards: int = 1) -> None:
        """``visual``, ``text``: each stream's ``cu_seqlens`` (padded streams may differ in count:
        the shorter gets empty sequences); ``shards``: the context-parallel shards of each stream."""
        count = max(visual.numel(), text.numel())
        visual, text = (F.pad(cu, (0, count - cu.numel()), value=int(cu[-1])) for cu in (visual, text))
        nv, nt = int(visual[-1]), int(text[-1])
        per_v, per_t = nv // shards, nt // shards  # rows of one shard of each stream
        samples = torch.arange(count - 1, device=visual.device)
        v_rows, t_rows = torch.arange(nv, device=visual.device), torch.arange(nt, device=visual.device)
        # Where each stream row sits among the rows attention receives.
        v_at = v_rows // max(per_v, 1) * (per_v + per_t) + v_rows % max(per_v, 1)
        t_at = t_rows // max(per_t, 1) * (per_v + per_t) + per_v + t_rows % max(per_t, 1)
        keys = torch.cat(
            [samples.repeat_interleave(visual.diff()) * 2, samples.repeat_interleave(text.diff()) * 2 + 1]
        )
        self.order = torch.cat([v_at, t_at])[torch.argsort(keys, stable=True)]
        self.inverse = torch.argsort(self.order)
        self.cu_seqlens = (visual + text).to(torch.int32)
        self.bounds = tuple(int(b) for b in self.cu_seqlens.tolist())
        self.max_seqlen = max(
            (b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)), default=0
        )


class JointAttention(nn.Module):
    """Softmax attention over :class:`JointPacking`'s per-sample sequences, ``[n, h, Dh]`` in and out."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, joint: JointPacking) -> torch.Tensor:
        order = joint.order
        out = varlen_attention(
            q[order],
            k[order],
            v[order],
            joint.cu_seqlens,
            joint.max_seqlen,
            backend=self.backend,
            bounds=joint.bounds,
        )
        return out[joint.inverse]


def joint_attention(
    attention: nn.Module,
    visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    joint: JointPacking,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stream's q, k, v ``[n_v | n_t, h, Dh]`` -> each stream's output ``[n_v | n_t, h·Dh]``."""
    q, k, v = (torch.cat([a, b]) for a, b in zip(visual, text, strict=True))
    out = attention(q, k, v, joint).flatten(1)
    return out[: visual[0].shape[0]], out[visual[0].shape[0] :]


class RefinerBlock(nn.Module):
    """diffusers' ``HunyuanVideoIndividualTokenRefinerBlock``: self-attention over one sample's text."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=False, backend=backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.ff = FeedForward(hidden_size, int(hidden_size * REFINER_MLP_RATIO), hidden_size, "silu")
        self.norm_out = Modulation(hidden_size, 2)

    def forward(
        self, x: torch.Tensor, table: torch.Tensor, index: torch.Tensor, attention: SequenceAttention
    ) -> torch.Tensor:
        gate_msa, gate_mlp = self.norm_out(table, index)
        q, k, v = self.attn.qkv(self.norm1(x))
        assert self.attn.to_out is not None
        x = x + self.attn.to_out[0](attention(q, k, v)) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class RefinerBlocks(nn.Module):
    """Holds the refiner blocks under diffusers' name (``token_refiner.refiner_blocks``)."""

    def __init__(self, hidden_size: int, num_heads: int, depth: int, backend: str) -> None:
        super().__init__()
        self.refiner_blocks = nn.ModuleList(
            RefinerBlock(hidden_size, num_heads, backend) for _ in range(depth)
        )


class TextRefiner(nn.Module):
    """diffusers' ``HunyuanVideoTokenRefiner``: text rows ``[Nt, text_dim]`` -> ``[Nt, d]``.

    Conditioned per sample on its timestep and the mean of its text embeddings; a sample's text
    attends only to itself (diffusers' padding mask over the same valid tokens gives the same rows).
    Whole on every rank of a parallel model (two blocks: small beside the transformer's).
    """

    def __init__(self, text_dim: int, hidden_size: int, num_heads: int, depth: int, backend: str) -> None:
        super().__init__()
        self.time_text_embed = TimestepTextEmbedding(hidden_size, text_dim, guidance=False)
        self.proj_in = nn.Linear(text_dim, hidden_size)
        self.token_refiner = RefinerBlocks(hidden_size, num_heads, depth, backend)

    def forward(
        self, text: torch.Tensor, owner: torch.Tensor, sample_t: torch.Tensor, backend: str
    ) -> torch.Tensor:
        """``text`` ``[Nt, E]``, ``owner`` ``[Nt]`` sample of each row (sorted), ``sample_t`` ``[B]``."""
        num_samples = sample_t.shape[0]
        counts = torch.bincount(owner, minlength=num_samples)  # [B]
        sums = text.new_zeros(num_samples, text.shape[1]).index_add_(0, owner, text)
        pooled = sums / counts.clamp(min=1)[:, None].to(text.dtype)  # [B, E] mean of each sample's text
        embed = self.time_text_embed
        table = embed.timestep(sample_t) + embed.text_embedder(pooled)  # [B, d]
        attention = SequenceAttention(sequence_bounds(counts)[0], backend)  # each sample's text rows alone
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, table, owner, attention)
        return x


@dataclass
class Streams:
    """What every block reads beside its two streams: modulation rows, positions, the joint packing.

    Rows are a rank's: ``*_index`` index the residual rows (a shard of them under sequence
    parallelism), ``positions`` the visual rows attention sees (after the column-parallel gather).
    """

    table: torch.Tensor  # [U, d] distinct modulation embeddings
    visual_index: torch.Tensor  # [n_v] row of ``table`` of each visual residual row
    text_index: torch.Tensor  # [n_t]
    positions: torch.Tensor  # [m_v, 4]
    rope: MultiAxisRope
    joint: JointPacking


class DualStreamBlock(nn.Module):
    """diffusers' ``HunyuanVideoTransformerBlock`` (and its token-replace form, which has the same weights)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_hidden_size: int, qk_norm: bool, backend: str
    ) -> None:
        super().__init__()
        self.norm1 = Modulation(hidden_size, 6)
        self.norm1_context = Modulation(hidden_size, 6)
        self.attn = Attention(hidden_size, num_heads, qk_norm, backend, added=True)
        self.ff = FeedForward(hidden_size, mlp_hidden_size, hidden_size, "gelu_tanh")
        self.ff_context = FeedForward(hidden_size, mlp_hidden_size, hidden_size, "gelu_tanh")

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, streams: Streams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``img`` ``[n_v, d]`` visual rows, ``txt`` ``[n_t, d]`` text rows -> the same, updated."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(streams.table, streams.visual_index)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(
            streams.table, streams.text_index
        )
        visual = self.attn.qkv(modulate(layer_norm(img), shift1, scale1), streams.rope, streams.positions)
        text = self.attn.added_qkv(modulate(layer_norm(txt), c_shift1, c_scale1))
        img_out, txt_out = joint_attention(self.attn.core_attention, visual, text, streams.joint)
        assert self.attn.to_out is not None
        img = img + self.attn.to_out[0](img_out) * gate1
        txt = txt + self.attn.to_add_out(txt_out) * c_gate1
        img = img + self.ff(modulate(layer_norm(img), shift2, scale2)) * gate2
        txt = txt + self.ff_context(modulate(layer_norm(txt), c_shift2, c_scale2)) * c_gate2
        return img, txt


class OutputNorm(nn.Module):
    """diffusers' ``AdaLayerNormContinuous`` (its linear yields scale first, then shift)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(table))[index].chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        # A Conv3d for diffusers' weight shape [d, C, pt, ph, pw]; it runs as a linear over patch
        # rows, whose features imontage orders (C, pt, ph, pw) like the flattened kernel.
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.proj.weight.flatten(1), self.proj.bias)


@dataclass
class StreamTimesteps:
    """The timesteps a packed batch is modulated with (module docstring), per sample and per token."""

    sample: torch.Tensor  # [B] each sample's denoising timestep: its target tokens' largest (0: none)
    block: torch.Tensor  # [N] the blocks': a visual token's own, a text token's sample's
    final: torch.Tensor  # [N] the output layer's: clean conditions take their sample's
    clean_condition: torch.Tensor  # [N] bool: visual tokens outside the targets, or at 0 while denoising


def stream_timesteps(batch: PackedBatch, owner: torch.Tensor) -> StreamTimesteps:
    """:class:`StreamTimesteps` of ``batch``; ``owner`` ``[N]`` the sample of each token."""
    t = batch.timesteps.float()
    visual = ~batch.is_text
    sample_t = t.new_zeros(batch.num_samples).scatter_reduce(
        0, owner, torch.where(batch.target_mask, t, torch.zeros_like(t)), "amax", include_self=True
    )
    denoising = sample_t[owner]  # [N]
    clean_condition = visual & (~batch.target_mask | ((t == 0) & (denoising > 0)))
    block_t = torch.where(visual, t, denoising)
    final_t = torch.where(visual & ~clean_condition, t, denoising)
    return StreamTimesteps(sample_t, block_t, final_t, clean_condition)


class DualStreamTransformer(nn.Module):
    """What HunyuanVideo and HunyuanVideo 1.5 share: visual rows patch-embedded, a text stream the
    family builds (:meth:`run_streams`' ``txt``), both through the blocks of :meth:`blocks`, then the
    adaLN output layer on the visual rows. Subclasses build the modules named in ``__init__``."""

    patch_size: tuple[int, int, int]
    in_channels: int
    backend: str
    x_embedder: PatchEmbed
    rope: MultiAxisRope
    norm_out: OutputNorm
    proj_out: nn.Linear
    token_layout: SampleTokenLayout

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def blocks(self) -> list[nn.Module]:
        """The blocks both streams run through, in order."""
        raise NotImplementedError

    def visual_features(self, batch: PackedBatch) -> torch.Tensor:
        """``[n, in_channels·pt·ph·pw]`` of a batch of visual rows: token features, then the channel
        condition (latent_concat: the condition latent and its mask, diffusers'
        ``cat([latents, image_latents, mask])``)."""
        features = batch.tokens
        width = self.in_channels * math.prod(self.patch_size)
        missing = width - features.shape[1]
        if batch.channel_condition is not None:
            features = torch.cat([features, batch.channel_condition], dim=1)
        elif missing > 0:  # no sample of the batch has a condition: zeros, as PackedBatch pads rows without
            features = torch.cat([features, features.new_zeros(features.shape[0], missing)], dim=1)
        if features.shape[1] != width:
            raise ValueError(
                f"visual rows carry {features.shape[1]} features (tokens + channel_condition); the patch "
                f"embedding takes in_channels {self.in_channels} × patch {self.patch_size} = {width}"
            )
        return features.to(self.x_embedder.proj.weight.dtype)

    def run_streams(
        self,
        batch: PackedBatch,
        owner: torch.Tensor,
        txt: torch.Tensor,
        text_counts: torch.Tensor,
        table: torch.Tensor,
        block_index: torch.Tensor,
        final_index: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity ``[N, out_channels·pt·ph·pw]`` of ``batch`` (text rows 0).

        ``txt`` ``[Nt, d]``: the text stream, whole, rows sample by sample (``text_counts`` ``[B]``
        each), with ``block_index`` ``[Nt + N_visual]`` their modulation rows in ``table`` ``[U, d]``
        and then the visual rows'; ``final_index`` ``[N_visual]``: the output layer's rows.
        """
        layout = self.token_layout
        visual = ~batch.is_text
        visual_batch = select_rows(batch, visual, owner)
        local = layout.shard_batch(visual_batch)  # this rank's visual rows; cu_seqlens: the whole stream's
        text_cu = layout.shard_batch(stream_batch(text_counts)).cu_seqlens  # the padded text stream's
        img = self.x_embedder(self.visual_features(local))  # [n_v, d]
        n_text = txt.shape[0]
        streams = Streams(
            table=layout.enter_table(table),
            visual_index=layout.enter_rows(layout.shard_rows(block_index[n_text:])),
            text_index=layout.enter_rows(layout.shard_rows(block_index[:n_text])),
            positions=local.positions,
            rope=self.rope,
            joint=JointPacking(local.cu_seqlens, text_cu, layout.context_size),
        )
        img, txt = layout.enter_rows(img), layout.enter_rows(layout.shard_rows(txt.to(img.dtype)))
        for block in self.blocks():
            img, txt = self._run(block, img, txt, streams)
        img = layout.exit_blocks(img)  # [n_v, d]: this rank's visual rows, whole
        out = self.proj_out(self.norm_out(img, table, layout.shard_rows(final_index)))
        out = layout.gather_output(out, visual_batch)  # [Nv, ·]
        full = out.new_zeros(batch.is_text.shape[0], out.shape[1])
        return full.index_put((visual.nonzero().squeeze(1),), out)

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# How the dual-stream blocks are cut over tensor-parallel ranks (each stream its own linears).
DUAL_STREAM_SPLITS: dict[str, TensorSplit] = linears(
    linears(
        {},
        ROWS,
        *(f"attn.{linear}" for linear in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")),
        "ff.net.0.proj",
        "ff_context.net.0.proj",
    ),
    COLUMNS,
    "attn.to_out.0",
    "attn.to_add_out",
    "ff.net.2",
    "ff_context.net.2",
)
MODULATION = ("linear.weight", "linear.bias")  # an adaLN modulation linear's parameters
DUAL_STREAM_BLOCKS = BlockPlan(
    DUAL_STREAM_SPLITS,
    heads="attn",
    head_modules=("attn",),
    mlp="ff.net.0.proj",
    self_attentions=("attn",),  # the joint attention of both streams
    head_partial=tuple(f"attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
    token_partial=tuple(f"{m}.{p}" for m in ("norm1", "norm1_context") for p in MODULATION),
)

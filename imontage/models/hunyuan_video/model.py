"""HunyuanVideo (diffusers' ``HunyuanVideoTransformer3DModel``) over imontage's packed batches.

Single-device code. Parameter names and shapes are diffusers' state_dict keys, so a diffusers
folder loads by name. A forward pass over a :class:`PackedBatch` of N tokens:
  visual rows: patch features ``[tokens | channel_condition]`` (C, pt, ph, pw) -> the patch Conv3d's
  weight as a linear; text rows: each sample's text through the token refiner (attention within
  the sample's own text);
  modulation: timestep (1000·t) + pooled text (+ distilled guidance) embedding, per token;
  ``depth`` dual-stream blocks (separate weights for the visual and text streams, joint attention
  within each sample), then single-stream blocks (one set of weights for both); adaLN output layer.
The visual and text rows stay two streams through every block, each a packed batch of its own
(:func:`select_rows`); parallelism enters only through ``model.token_layout`` (a
:class:`SampleTokenLayout`), which shards each stream, and the joint attention's
:class:`JointPacking`, which lays each sample's rows of both streams together.

Modulation is per token, and equals diffusers' per-sample modulation whenever diffusers can express
the input: a sample's denoising timestep t_s is the largest timestep of its target tokens; text
takes E(t_s), noised visual tokens E(t_token), E(t) = T(t) + P(pooled) + G(guidance); clean conditions (tokens outside
the targets, and target tokens at timestep 0 while their sample is being denoised: token_replace's
first frame) take T(t_token) + P(pooled), diffusers' ``token_replace_emb``, which has no guidance term.
The output layer modulates clean conditions like their sample's targets (their rows are not trained on).
So ``image_condition_type`` changes no code path: token_replace is a target video whose first-frame
tokens are clean with timestep 0 (a one-frame sample, all at 0, has nothing being denoised and is
modulated as a target); latent_concat is ``channel_condition`` = [image latent, mask] per target row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imontage.models.common.dual_stream import (
    Attention,
    DualStreamBlock,
    DualStreamTransformer,
    Modulation,
    OutputNorm,
    PatchEmbed,
    Streams,
    TextRefiner,
    TimestepTextEmbedding,
    joint_attention,
    layer_norm,
    modulate,
    stream_timesteps,
)
from imontage.models.common.rope import MultiAxisRope
from imontage.models.common.sequence import PackedBatch
from imontage.models.common.token_layout import SampleTokenLayout


class SingleStreamBlock(nn.Module):
    """diffusers' ``HunyuanVideoSingleTransformerBlock``: parallel attention and MLP, one set of
    weights for both streams (RoPE on the visual rows only, as diffusers rotates)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_hidden_size: int, qk_norm: bool, backend: str
    ) -> None:
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, qk_norm, backend, output=False)
        self.norm = Modulation(hidden_size, 3)
        self.proj_mlp = nn.Linear(hidden_size, mlp_hidden_size)
        self.proj_out = nn.Linear(hidden_size + mlp_hidden_size, hidden_size)  # input [attention | MLP]

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, streams: Streams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.norm(streams.table, streams.visual_index)
        c_shift, c_scale, c_gate = self.norm(streams.table, streams.text_index)
        h_img, h_txt = modulate(layer_norm(img), shift, scale), modulate(layer_norm(txt), c_shift, c_scale)
        img_attn, txt_attn = joint_attention(
            self.attn.core_attention,
            self.attn.qkv(h_img, streams.rope, streams.positions),
            self.attn.qkv(h_txt),
            streams.joint,
        )
        img_mlp = F.gelu(self.proj_mlp(h_img), approximate="tanh")
        txt_mlp = F.gelu(self.proj_mlp(h_txt), approximate="tanh")
        img = img + self.proj_out(torch.cat([img_attn, img_mlp], dim=-1)) * gate
        txt = txt + self.proj_out(torch.cat([txt_attn, txt_mlp], dim=-1)) * c_gate
        return img, txt


class HunyuanVideoTransformer(DualStreamTransformer):
    """HunyuanVideo's transformer over packed multi-segment samples (see the module docstring)."""

    def __init__(self, cfg: Any) -> None:
        """``cfg``: a :class:`~imontage.config.schema.ModelConfig` with ``family: hunyuan_video``."""
        super().__init__()
        hv = cfg.hunyuan_video
        if str(cfg.prediction) != "velocity":
            raise ValueError(f"model.prediction={cfg.prediction}: HunyuanVideo predicts the velocity")
        if str(hv.image_condition_type) not in ("", "latent_concat", "token_replace"):
            raise ValueError(
                f"model.hunyuan_video.image_condition_type '{hv.image_condition_type}' is unknown"
            )
        self.patch_size = tuple(int(p) for p in cfg.patch_size)  # type: ignore[assignment]
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(hv.out_channels)
        self.image_condition_type = str(hv.image_condition_type)
        hidden, heads = int(cfg.hidden_size), int(cfg.num_heads)
        mlp, qk_norm = int(cfg.mlp_hidden_size), bool(cfg.qk_norm)
        self.hidden_size = hidden
        self.backend = str(cfg.attention_backend)

        self.x_embedder = PatchEmbed(self.in_channels, hidden, self.patch_size)
        self.context_embedder = TextRefiner(
            int(cfg.text_dim), hidden, heads, int(hv.num_refiner_layers), self.backend
        )
        self.time_text_embed = TimestepTextEmbedding(
            hidden, int(hv.pooled_projection_dim), bool(hv.guidance_embeds)
        )
        self.rope = MultiAxisRope(cfg.rope.bands, cfg.rope.theta, str(cfg.rope.pair_layout))
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(hidden, heads, mlp, qk_norm, self.backend) for _ in range(int(cfg.depth))
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, heads, mlp, qk_norm, self.backend)
            for _ in range(int(hv.num_single_layers))
        )
        self.norm_out = OutputNorm(hidden)
        self.proj_out = nn.Linear(hidden, self.out_channels * math.prod(self.patch_size))
        self.token_layout = SampleTokenLayout()

    def blocks(self) -> list[nn.Module]:
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def conditioning(
        self, batch: PackedBatch, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distinct modulation embeddings ``[U, d]``, each token's row in them for the blocks and for
        the output layer (``[N]`` each), and each sample's denoising timestep ``[B]``."""
        times = stream_timesteps(batch, owner)
        guided = (~times.clean_condition).double()
        # Keys (sample, timestep, guided): the blocks' and the output layer's rows share one table.
        keys = torch.cat(
            [
                torch.stack([owner.double(), times.block.double(), guided], dim=1),
                torch.stack([owner.double(), times.final.double(), torch.ones_like(guided)], dim=1),
            ]
        )
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        u_sample, u_t, u_guided = unique[:, 0].long(), unique[:, 1].float(), unique[:, 2].bool()
        embed = self.time_text_embed
        if batch.pooled_text is None:
            raise ValueError("HunyuanVideo needs each sample's pooled text (Sample.pooled_text)")
        dtype = embed.text_embedder.linear_1.weight.dtype
        table = embed.timestep(u_t) + embed.text_embedder(batch.pooled_text.to(dtype))[u_sample]
        if embed.guidance_embedder is not None:
            if batch.guidance is None:
                raise ValueError("a guidance-distilled HunyuanVideo needs each sample's guidance scale")
            guidance = embed.guidance(batch.guidance)  # [B, d]
            table = table + guidance[u_sample] * u_guided[:, None].to(table.dtype)
        n = owner.shape[0]
        return table, inverse[:n], inverse[n:], times.sample

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """``[N, out_channels·pt·ph·pw]`` velocity ε − x0 per token, features (C, pt, ph, pw); text rows 0."""
        owner = batch.sample_index()
        visual, text = ~batch.is_text, batch.is_text
        table, block_index, final_index, sample_t = self.conditioning(batch, owner)
        if batch.text_embeds is not None:
            text_embeds = batch.text_embeds[text].to(self.x_embedder.proj.weight.dtype)
        elif bool(text.any()):
            raise ValueError(
                "HunyuanVideo reads precomputed text embeddings: text segments carry data [L, E]"
            )
        else:
            text_embeds = self.x_embedder.proj.weight.new_zeros(0, self.context_embedder.proj_in.in_features)
        # Run even without text rows: under ZeRO-3 every rank must enter the same modules.
        txt = self.context_embedder(text_embeds, owner[text], sample_t, self.backend)  # [Nt, d], whole
        text_counts = torch.bincount(owner[text], minlength=batch.num_samples)
        return self.run_streams(
            batch,
            owner,
            txt,
            text_counts,
            table,
            torch.cat([block_index[text], block_index[visual]]),
            final_index[visual],
        )


def build_hunyuan_video(cfg: Any, device: torch.device | str | None = None) -> HunyuanVideoTransformer:
    """Build HunyuanVideo's transformer; ``device="meta"`` builds its shapes only (13B: 51 GB in fp32)."""
    with torch.device(device or "cpu"):
        return HunyuanVideoTransformer(cfg)

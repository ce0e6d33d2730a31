"""HunyuanVideo's part of the cost model (:class:`~imontage.models.common.cost.FamilyCost`): what
its dual- and single-stream blocks and its token refiner keep for the backward pass. It has no
communication plan yet, and adapters on it are not modelled."""

from __future__ import annotations

from typing import Any

from imontage.models.common.cost import (
    FP32,
    Activations,
    BlockActivations,
    FamilyCost,
    Kept,
    Layout,
    MicroBatch,
    ModelShape,
    Saved,
    Shards,
    dims,
    patch_volume,
)


def shape(cfg: Any) -> dict[str, Any]:
    """Its output channels, single-stream and refiner blocks, pooled text and guidance (``model.hunyuan_video``)."""
    hv = cfg.hunyuan_video
    return {
        "patch_features": int(hv.out_channels) * patch_volume(cfg),
        "single_blocks": int(hv.num_single_layers),
        "refiner_blocks": int(hv.num_refiner_layers),
        "pooled_dim": int(hv.pooled_projection_dim),
        "guidance": bool(hv.guidance_embeds),
    }


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    """HunyuanVideo: a visual and a text stream, each sharded on its own; one modulation row per
    sample (``U = samples``: a sample denoised at one timestep; per-token timesteps add rows)."""
    visual, text = Shards.of(batch.tokens, layout), Shards.of(batch.text_tokens, layout)
    d, a, h, f = dims(model, layout)
    samples = batch.samples
    joint = visual.sequence + text.sequence  # rows of the joint attention on this rank
    streams = (("img", visual), ("txt", text))

    def modulated(k: Kept, stream: str, s: int, norm: str, into: str) -> None:
        k.add(f"{stream}.{norm}.x", s, d)
        k.stats(f"{stream}.{norm}", s)
        k.add(f"{stream}.{norm}.out", s, d)
        k.add(f"{stream}.{norm}.scale", s, d)
        k.add(into, s, d)

    def per_head_norms(k: Kept, name: str, rows: int) -> None:
        k.add(f"{name}.in", rows, a)  # nn.RMSNorm per head (the text stream: not fused with RoPE)
        k.add(f"{name}.rstd", rows, h, FP32)

    def attention(k: Kept) -> None:
        for name in ("q", "k", "v", "out"):  # gathered into per-sample order for flash attention
            k.add(f"joint.{name}", joint, a)
        k.add("joint.lse", joint, h, FP32)
        if model.qk_norm:
            k.add("img.q", visual.sequence, a)  # the fused QK-norm + RoPE kernel's inputs
            k.add("img.k", visual.sequence, a)

    dual = Kept(e)
    dual.add("modulation.silu", samples, 2 * d)  # norm1's and norm1_context's SiLU of the table
    for stream, rows in streams:
        s, n = rows.residual, rows.sequence
        modulated(dual, stream, s, "norm1", f"{stream}.attn.in")
        modulated(dual, stream, s, "norm2", f"{stream}.ff.in")
        dual.add(f"{stream}.modulation", s, 6 * d)  # the gates keep the rows' 6 vectors
        dual.add(f"{stream}.attn.out", s, d)  # gated
        dual.add(f"{stream}.ff.hidden", n, f)
        dual.add(f"{stream}.ff.act", n, f)
        dual.add(f"{stream}.ff.out", s, d)
    per_head_norms(dual, "txt.norm_q", text.sequence)
    per_head_norms(dual, "txt.norm_k", text.sequence)
    attention(dual)
    dual.add("joint.out.streams", joint, a)  # back in stream order: both output projections' input
    single = Kept(e)
    single.add("modulation.silu", samples, 2 * d)  # one SiLU of the table per stream
    for stream, rows in streams:
        s, n = rows.residual, rows.sequence
        modulated(single, stream, s, "norm", f"{stream}.in")
        single.add(f"{stream}.modulation", s, 3 * d)
        single.add(f"{stream}.mlp.hidden", n, f)  # GELU's input
        single.add(f"{stream}.proj_out.in", n, a + f)  # [attention | MLP]
        single.add(f"{stream}.proj_out.out", s, d)  # gated
    if model.qk_norm:
        per_head_norms(single, "txt.norm_q", text.sequence)
        per_head_norms(single, "txt.norm_k", text.sequence)
    attention(single)
    inputs = tuple(Saved(f"{stream}.x", rows.residual, d, e) for stream, rows in streams)
    blocks = (
        BlockActivations("transformer_blocks", model.depth, dual.saved(), inputs),
        BlockActivations("single_transformer_blocks", model.single_blocks, single.saved(), inputs),
    )
    o = Kept(e)
    # Modulation rows: the timestep, pooled text and guidance embeddings, their sum (the table).
    o.add("cond.time.freq", samples, 256)
    o.add("cond.pooled.in", samples, model.pooled_dim)
    names = [
        "cond.time.hidden",
        "cond.time.act",
        "cond.pooled.hidden",
        "cond.pooled.act",
        "table",
        "final.silu",
    ]
    if model.guidance:
        o.add("cond.guidance.freq", samples, 256)
        o.add("cond.guidance.mask", samples, 1)
        names += ["cond.guidance.hidden", "cond.guidance.act"]
    for name in names:
        o.add(name, samples, d)
    o.add("x_embedder.in", visual.sequence, model.in_features)
    # The token refiner: every text row, whole on every rank, per sample (timestep + mean text).
    rows_t = batch.text_tokens
    o.add("refiner.time.freq", samples, 256)
    o.add("refiner.pooled.in", samples, model.text_dim)
    for name in (
        "refiner.time.hidden",
        "refiner.time.act",
        "refiner.pooled.hidden",
        "refiner.pooled.act",
        "refiner.table",
    ):
        o.add(name, samples, d)
    o.add("refiner.proj_in.in", rows_t, model.text_dim)
    for i in range(model.refiner_blocks):
        r = f"refiner.{i}"
        o.add(f"{r}.table.silu", samples, d)
        for norm in ("norm1", "norm2"):
            o.add(f"{r}.{norm}.x", rows_t, d)
            o.stats(f"{r}.{norm}", rows_t)
            o.add(f"{r}.{norm}.out", rows_t, d)
        for name in ("q", "k", "v", "out", "to_out.out", "ff.out"):
            o.add(f"{r}.{name}", rows_t, d)
        o.add(f"{r}.lse", rows_t, model.num_heads, FP32)
        o.add(f"{r}.gates", rows_t, 2 * d)
        o.add(f"{r}.ff.hidden", rows_t, 4 * d)
        o.add(f"{r}.ff.act", rows_t, 4 * d)
    o.add("final.x", visual.sequence, d)
    o.stats("final.norm", visual.sequence)
    for name in ("final.norm.out", "final.scale", "final.proj_out.in"):
        o.add(name, visual.sequence, d)
    # The first dual block keeps both streams' inputs (their LayerNorms' inputs, or its checkpoint):
    # its visual rows slice the CP shard's embeddings, its text rows the whole text stream (the
    # refiner runs whole on every rank; its CP and SP shards are slices).
    whole = {"img": visual.sequence, "txt": text.total}
    view = tuple(
        Saved(f"{stream}.x.unsharded", whole[stream] - r.residual, d, e)
        for stream, r in streams
        if whole[stream] > r.residual
    )
    return Activations(blocks, o.saved(), (), layout.activation_checkpointing, view)


COST = FamilyCost(shape=shape, activations=activations)

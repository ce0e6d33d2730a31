"""HunyuanVideo's part of the cost model (:class:`~imontage.models.common.cost.FamilyCost`): what
its dual- and single-stream blocks and its token refiner keep for the backward pass (the terms every
dual-stream family shares are :mod:`imontage.models.common.dual_stream_cost`'s), and its collectives
under TP, SP and Ulysses (both streams through the dual- then the single-stream blocks); adapters on
it are not modelled."""

from __future__ import annotations

from typing import Any

from imontage.models.common.cost import (
    Activations,
    BlockActivations,
    CallPlan,
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
from imontage.models.common.dual_stream_cost import (
    FREQUENCIES,
    joint_attention,
    joint_attention_rows,
    mlp_embedding,
    modulated,
    per_head_norms,
    refiner,
    stream_activations,
    stream_parallel_outside,
    stream_tensor_parallel,
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


def single_block(
    model: ModelShape, visual: Shards, text: Shards, layout: Layout, samples: int, e: int
) -> Kept:
    """A single-stream block (one set of weights for both streams)."""
    d, a, h, f = dims(model, layout)
    k = Kept(e)
    k.add("modulation.silu", samples, 2 * d)  # one SiLU of the table per stream
    for stream, rows in (("img", visual), ("txt", text)):
        s, n = rows.residual, rows.sequence
        modulated(k, stream, s, d, "norm", f"{stream}.in")
        k.add(f"{stream}.modulation", s, 3 * d)
        k.add(f"{stream}.mlp.hidden", n, f)  # GELU's input
        k.add(f"{stream}.proj_out.in", n, a + f)  # [attention | MLP]
        k.add(f"{stream}.proj_out.out", s, d)  # gated
    if model.qk_norm:
        per_head_norms(k, "txt.norm_q", text.sequence, a, h)
        per_head_norms(k, "txt.norm_k", text.sequence, a, h)
    joint_attention(k, model, visual, text, a, h)
    return k


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    """HunyuanVideo: the modulation table is the timestep, pooled text (and guidance) embeddings
    summed; the text stream is the refiner's output on every text row."""
    samples, d = batch.samples, model.hidden_size

    def conditioning(o: Kept) -> None:
        mlp_embedding(o, "cond.time", samples, FREQUENCIES, d)
        mlp_embedding(o, "cond.pooled", samples, model.pooled_dim, d)
        if model.guidance:
            mlp_embedding(o, "cond.guidance", samples, FREQUENCIES, d)
            o.add("cond.guidance.mask", samples, 1)
        o.add("table", samples, d)
        refiner(o, model, batch.text_tokens, samples)

    def single_blocks(visual: Shards, text: Shards, inputs: tuple[Saved, ...]) -> list[BlockActivations]:
        if not model.single_blocks:
            return []
        kept = single_block(model, visual, text, layout, samples, e).saved()
        return [BlockActivations("single_transformer_blocks", model.single_blocks, kept, inputs)]

    return stream_activations(model, batch, layout, e, batch.text_tokens, conditioning, single_blocks)


def tensor_parallel(calls: CallPlan, model: ModelShape, n: int, batch: MicroBatch) -> None:
    """Its dual- then single-stream blocks' collectives (:func:`stream_tensor_parallel`)."""
    stream_tensor_parallel(calls, model, n, Shards.of(batch.text_tokens, calls.layout).sequence)


def sequence_parallel_outside(calls: CallPlan, model: ModelShape, batch: MicroBatch) -> None:
    stream_parallel_outside(calls, model, batch, batch.text_tokens)


def attention_rows(model: ModelShape, batch: MicroBatch, layout: Layout) -> int:
    return joint_attention_rows(batch, layout, batch.text_tokens)


COST = FamilyCost(
    shape=shape,
    activations=activations,
    tensor_parallel=tensor_parallel,
    attention="block.attn",
    attention_rows=attention_rows,
    sequence_parallel_outside=sequence_parallel_outside,
)

"""The own DiT's part of the cost model (:class:`~imontage.models.common.cost.FamilyCost`): its
collectives under tensor parallelism and what its blocks keep for the backward pass."""

from __future__ import annotations

from typing import Any

from imontage.models.common.cost import (
    Activations,
    BlockActivations,
    CallPlan,
    FamilyCost,
    Kept,
    Layout,
    LoraCost,
    MicroBatch,
    ModelShape,
    Saved,
    Shards,
    dims,
    patch_volume,
    self_attention,
)


def shape(cfg: Any) -> dict[str, Any]:
    """Text tokens are packed into its sequence; its output is its input's patch."""
    return {"patch_features": int(cfg.in_channels) * patch_volume(cfg), "text_in_sequence": True}


def tensor_parallel(calls: CallPlan, model: ModelShape, n: int, batch: MicroBatch) -> None:
    """Per block: ``qkv`` and ``fc1`` column-parallel, ``proj`` and ``fc2`` row-parallel."""
    d = model.hidden_size
    calls.columns(("block.qkv", "block.fc1"), n * d)
    calls.rows(("block.proj", "block.fc2"), n * d)
    grads = [("block.qk_norm", model.head_dim)] * (2 if model.qk_norm else 0)
    if calls.layout.sequence_parallel:
        grads += [("block.modulation", 6 * d)] + [("block.row_bias", d)] * 2
    calls.summed_gradients(grads)


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    rows = Shards.of(batch.sequence(model), layout)
    n, s = rows.sequence, rows.residual
    d, a, h, f = dims(model, layout)
    k = Kept(e)
    k.add("table", s, 6 * d)  # the modulation plus the block's offset: the gates keep it
    for norm, x in (("norm1", "x"), ("norm2", "x2")):  # x: the block's input; x2 after attention
        k.add(x, s, d)
        k.stats(norm, s)
        k.add(f"{norm}.out", s, d)
        k.add(f"{norm}.scale", s, d)  # 1 + scale
    k.add("qkv.in", s, d)  # under SP this rank's shard: the column-parallel layer gathers it again
    k.add("qkv.out", n, 3 * a)  # q and k kept by the fused QK-norm + RoPE kernel, v (a view) by attention
    self_attention(k, "attn", n, a, h, layout.context, v="qkv.out")
    k.add("proj.out", s, d)
    k.add("fc1.in", s, d)
    k.add("fc1.out", n, f)
    k.add("fc2.in", n, f)
    k.add("fc2.out", s, d)
    block = BlockActivations("blocks", model.depth, k.saved(), (Saved("x", s, d, e),))
    o = Kept(e)  # on the CP shard's n rows, before SP shards them
    o.add("patch_embed.in", n, model.in_features)
    o.add("text_proj.in", n, model.text_dim)  # the text path runs on every row
    for name in ("text_proj.hidden", "text_proj.act", "time.hidden", "time.act", "t_emb", "t_emb.silu"):
        o.add(name, n, d)
    o.add("time.freq", n, 256)
    o.add("final.silu", n, d)
    o.add("final.x", n, d)
    o.stats("final.norm", n)
    for name in ("final.norm.out", "final.scale", "final.linear.in"):
        o.add(name, n, d)
    # The checkpoints share the modulation: under SP a slice that keeps all n rows. Block 0 keeps
    # its input x (LayerNorm's input) whether checkpointed or not.
    shared = (Saved("modulation", n, 6 * d, e),)
    view = (Saved("x.unsharded", n - s, d, e),) if n > s else ()
    return Activations((block,), o.saved(), shared, layout.activation_checkpointing, view)


COST = FamilyCost(
    shape=shape,
    activations=activations,
    tensor_parallel=tensor_parallel,
    lora=LoraCost(
        block_linears=("qkv", "proj", "fc1", "fc2"),
        dropped=("norm1.out", "proj.out", "norm2.out", "fc2.out"),
        outside=("final.x", "final.norm.stats", "final.scale"),
    ),
)

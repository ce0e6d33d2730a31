"""Wan 2.1's part of the cost model (:class:`~imontage.models.common.cost.FamilyCost`): its
collectives under tensor parallelism and what its blocks keep for the backward pass (``M`` text
context rows: samples × ``wan.text_len``; ``L`` CLIP image rows, I2V)."""

from __future__ import annotations

from typing import Any

from imontage.models.common.cost import (
    FP32,
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

CLIP_IMAGE_TOKENS = 257  # I2V: CLIP ViT-H/14 tokens of one 224² image (16 × 16 + 1)
IMAGE_LINEARS = ("attn2.add_k_proj", "attn2.add_v_proj")  # I2V: the image tokens' keys and values


def shape(cfg: Any) -> dict[str, Any]:
    """Its output channels, text context length and cross-attention widths (``model.wan``)."""
    wan = cfg.wan
    return {
        "patch_features": int(wan.out_channels) * patch_volume(cfg),
        "text_len": int(wan.text_len),
        "image_dim": int(wan.image_dim),
        "image_tokens": CLIP_IMAGE_TOKENS if int(wan.image_dim) else 0,
        "added_kv_dim": int(wan.added_kv_proj_dim),
        "cross_attn_norm": bool(wan.cross_attn_norm),
        "freq_dim": int(wan.freq_dim),
    }


def tensor_parallel(calls: CallPlan, model: ModelShape, n: int, batch: MicroBatch) -> None:
    """Per block: five column-parallel and three row-parallel linears, the context's keys and values
    whole on every rank, and the q/k norms across heads summed over TP."""
    d = model.hidden_size
    context = model.context_rows(batch)
    image = batch.image_tokens if model.image_dim else 0
    calls.columns(
        (
            "block.attn1.to_q",
            "block.attn1.to_k",
            "block.attn1.to_v",
            "block.attn2.to_q",
            "block.ffn.net.0.proj",
        ),
        n * d,
    )
    calls.rows(("block.attn1.to_out.0", "block.attn2.to_out.0", "block.ffn.net.2"), n * d)
    # The cross-attention's keys and values read the context, whole on every rank: TP all-reduces
    # the gradient of their input, with or without SP.
    whole = [("block.attn2.to_k", context * d), ("block.attn2.to_v", context * d)]
    if image:
        whole += [
            (f"block.attn2.{name}", image * model.added_kv_dim) for name in ("add_k_proj", "add_v_proj")
        ]
    for where, numel in whole:
        calls.add(where, "all_reduce", "tp", numel, "backward")
    # RMSNorm across all heads (HeadShardedRMSNorm): the fp32 sums of squares [rows, 1] are summed
    # over TP in the forward pass, and their gradients in the backward pass (SumOverRanks).
    norms = [("block.attn1.norm_q", n), ("block.attn1.norm_k", n), ("block.attn2.norm_q", n)]
    norms += [("block.attn2.norm_k", context)] + ([("block.attn2.norm_added_k", image)] if image else [])
    for where, rows in norms:
        for phase in ("forward", "backward"):
            calls.add(where, "all_reduce", "tp", rows, phase, element_bytes=FP32)
    if calls.layout.sequence_parallel:
        grads = [("block.scale_shift_table", 6 * d)]
        grads += [("block.norm2", d)] * (2 if model.cross_attn_norm else 0)  # weight and bias
        grads += [("block.row_bias", d)] * 3  # to_out.0 (twice) and ffn.net.2: added after the reduce-scatter
        calls.summed_gradients(grads)


def _norm(k: Kept, name: str, rows: int, a: int, tensor: int) -> None:
    """Wan's q/k RMSNorm across heads on ``rows``: nn.RMSNorm on one rank, HeadShardedRMSNorm under TP."""
    if tensor == 1:
        k.add(f"{name}.in", rows, a)
        k.add(f"{name}.rstd", rows, 1, FP32)
        return
    k.float32(f"{name}.in", rows, a)  # x.float(), squared
    k.add(f"{name}.in" if k.e == FP32 else f"{name}.in.float2", rows, a, FP32)  # x.float() again, scaled
    k.add(f"{name}.rsqrt", rows, 1, FP32)
    k.add(f"{name}.normed", rows, a)  # cast back, times the weight


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    rows = Shards.of(batch.tokens, layout)
    n, s, t = rows.sequence, rows.residual, layout.tensor
    d, a, h, f = dims(model, layout)
    context = model.context_rows(batch)
    image = batch.image_tokens if model.image_dim else 0
    k = Kept(e)
    k.add("table", s, 6 * d, FP32)  # scale_shift_table + modulation in fp32: the gates keep it
    for norm, x, into in (("norm1", "x", "attn1.in"), ("norm3", "x3", "ffn.in")):  # modulated, fp32
        k.float32(x, s, d)
        k.stats(norm, s)
        k.add(f"{norm}.out", s, d, FP32)
        k.add(f"{norm}.scale", s, d, FP32)  # 1 + scale
        k.add(into, s, d)  # cast back: the column-parallel layers' input (under SP this rank's shard)
    # self-attention
    _norm(k, "attn1.norm_q", n, a, t)
    _norm(k, "attn1.norm_k", n, a, t)
    self_attention(k, "attn1", n, a, h, layout.context, v="attn1.v")  # q, k rotated by the kernel
    k.add("attn1.to_out.out", s, d)  # gated
    # cross-attention, on the rank's own queries, against the whole context
    if model.cross_attn_norm:
        k.float32("x2", s, d)
        k.stats("norm2", s)
        if e != FP32:
            k.add("norm2.params.float", 1, 2 * d, FP32)  # weight.float(), bias.float()
        k.add("attn2.in", s, d)
    else:
        k.add("x2" if e == FP32 else "attn2.in", s, d)
    for name, kv_rows in (("attn2", context), ("attn2.image", image)):
        _norm(k, f"{name}.norm_k", kv_rows, a, t)
        k.add(f"{name}.k", kv_rows, a)
        k.add(f"{name}.v", kv_rows, a)
        k.add(f"{name}.out", n if kv_rows else 0, a)
        k.add(f"{name}.lse", n if kv_rows else 0, h, FP32)
    _norm(k, "attn2.norm_q", n, a, t)
    k.add("attn2.q", n, a)
    k.add("attn2.out_sum" if image else "attn2.out", n, a)  # the output projection's input
    # feed-forward
    k.add("ffn.hidden", n, f)  # GELU's input
    k.add("ffn.act", n, f)
    k.float32("ffn.out", s, d)  # gated in fp32
    block = BlockActivations("blocks", model.depth, k.saved(), (Saved("x", s, d, e),))
    o = Kept(e)  # the CP shard's n visual rows, before SP shards them
    o.add("patch_embedding.in", n, model.in_features)
    o.add("time.freq", n, model.freq_dim)
    for name in ("time.hidden", "time.act", "temb", "temb.silu"):
        o.add(name, n, d)
    o.add("text.in", context, model.text_dim)
    for name in ("text.hidden", "text.act", "text.context"):  # the context every block reads
        o.add(name, context, d)
    if image:
        for name, width in (("image.norm1", model.image_dim), ("image.norm2", d)):
            o.float32(f"{name}.in", image, width)
            o.stats(name, image)
            if e != FP32:
                o.add(f"{name}.params.float", 1, 2 * width, FP32)
        for name in ("image.ff.in", "image.ff.hidden", "image.ff.act"):
            o.add(name, image, model.image_dim)
        o.add("image.context", image, d)  # what add_k_proj and add_v_proj read
    o.float32("head.x", n, d)
    o.stats("head.norm", n)
    o.add("head.norm.out", n, d, FP32)
    o.add("head.scale", n, d, FP32)
    o.add("head.proj_out.in", n, d)
    shared = (Saved("modulation", n, 6 * d, e),)  # under SP a slice that keeps all n rows
    # Block 0 keeps its input when checkpointed, or in fp32 (norm1's input is then x itself).
    kept_input = layout.activation_checkpointing or e == FP32
    view = (Saved("x.unsharded", n - s, d, e),) if kept_input and n > s else ()
    return Activations((block,), o.saved(), shared, layout.activation_checkpointing, view)


def lora_rows(model: ModelShape, batch: MicroBatch, layout: Layout) -> dict[str, int]:
    """The cross-attention's keys and values read the text context (and I2V's image tokens)."""
    context = model.context_rows(batch)
    rows = {"attn2.to_k": context, "attn2.to_v": context}
    return rows | (dict.fromkeys(IMAGE_LINEARS, batch.image_tokens) if model.image_dim else {})


COST = FamilyCost(
    shape=shape,
    activations=activations,
    tensor_parallel=tensor_parallel,
    attention="block.attn1",
    lora=LoraCost(
        block_linears=tuple(f"attn{i}.to_{x}" for i in (1, 2) for x in ("q", "k", "v", "out.0"))
        + ("ffn.net.0.proj", "ffn.net.2"),
        dropped=("norm1.out", "attn1.to_out.out", "norm3.out", "ffn.out", "ffn.out.float"),
        outside=("text.context", "image.context", "head.x", "head.x.float", "head.norm.stats", "head.scale"),
        image_linears=IMAGE_LINEARS,
        rows=lora_rows,
    ),
)

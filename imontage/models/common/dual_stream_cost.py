"""What the dual-stream (MMDiT) families keep for the backward pass (:mod:`imontage.models.common.dual_stream`):
the terms of their :class:`~imontage.models.common.cost.FamilyCost` that HunyuanVideo and
HunyuanVideo 1.5 share: the dual-stream blocks, the token refiner, the patch embedding and the
output layer, around a text stream each family builds (:func:`stream_activations`)."""

from __future__ import annotations

from collections.abc import Callable

from imontage.models.common.cost import (
    FP32,
    Activations,
    BlockActivations,
    CallPlan,
    Kept,
    Layout,
    MicroBatch,
    ModelShape,
    Saved,
    Shards,
    dims,
)

FREQUENCIES = 256  # sinusoidal timestep features


def modulated(k: Kept, stream: str, s: int, d: int, norm: str, into: str) -> None:
    """A LayerNorm (no affine) times ``1 + scale`` plus shift: what its input and product keep."""
    k.add(f"{stream}.{norm}.x", s, d)
    k.stats(f"{stream}.{norm}", s)
    k.add(f"{stream}.{norm}.out", s, d)
    k.add(f"{stream}.{norm}.scale", s, d)
    k.add(into, s, d)


def per_head_norms(k: Kept, name: str, rows: int, a: int, h: int) -> None:
    k.add(f"{name}.in", rows, a)  # nn.RMSNorm per head (the text stream: not fused with RoPE)
    k.add(f"{name}.rstd", rows, h, FP32)


def joint_attention(k: Kept, model: ModelShape, visual: Shards, text: Shards, a: int, h: int) -> None:
    joint = visual.sequence + text.sequence  # rows of the joint attention on this rank
    for name in ("q", "k", "v", "out"):  # gathered into per-sample order for flash attention
        k.add(f"joint.{name}", joint, a)
    k.add("joint.lse", joint, h, FP32)
    if model.qk_norm:
        k.add("img.q", visual.sequence, a)  # the fused QK-norm + RoPE kernel's inputs
        k.add("img.k", visual.sequence, a)


def dual_block(model: ModelShape, visual: Shards, text: Shards, layout: Layout, samples: int, e: int) -> Kept:
    """A dual-stream block (one modulation row per sample)."""
    d, a, h, f = dims(model, layout)
    k = Kept(e)
    k.add("modulation.silu", samples, 2 * d)  # norm1's and norm1_context's SiLU of the table
    for stream, rows in (("img", visual), ("txt", text)):
        s, n = rows.residual, rows.sequence
        modulated(k, stream, s, d, "norm1", f"{stream}.attn.in")
        modulated(k, stream, s, d, "norm2", f"{stream}.ff.in")
        k.add(f"{stream}.modulation", s, 6 * d)  # the gates keep the rows' 6 vectors
        k.add(f"{stream}.attn.out", s, d)  # gated
        k.add(f"{stream}.ff.hidden", n, f)
        k.add(f"{stream}.ff.act", n, f)
        k.add(f"{stream}.ff.out", s, d)
    per_head_norms(k, "txt.norm_q", text.sequence, a, h)
    per_head_norms(k, "txt.norm_k", text.sequence, a, h)
    joint_attention(k, model, visual, text, a, h)
    k.add(
        "joint.out.streams", text.sequence + visual.sequence, a
    )  # back in stream order: both output projections' input
    return k


def mlp_embedding(o: Kept, name: str, rows: int, in_features: int, d: int) -> None:
    """Linear, SiLU, linear (a timestep or pooled-text embedding): its input, hidden and activation."""
    o.add(f"{name}.in", rows, in_features)
    o.add(f"{name}.hidden", rows, d)
    o.add(f"{name}.act", rows, d)


def refiner(o: Kept, model: ModelShape, rows: int, samples: int) -> None:
    """The token refiner on ``rows`` text rows, whole on every rank, per sample (timestep + mean text)."""
    d = model.hidden_size
    mlp_embedding(o, "refiner.time", samples, FREQUENCIES, d)
    mlp_embedding(o, "refiner.pooled", samples, model.text_dim, d)
    o.add("refiner.table", samples, d)
    o.add("refiner.proj_in.in", rows, model.text_dim)
    for i in range(model.refiner_blocks):
        r = f"refiner.{i}"
        o.add(f"{r}.table.silu", samples, d)
        for norm in ("norm1", "norm2"):
            o.add(f"{r}.{norm}.x", rows, d)
            o.stats(f"{r}.{norm}", rows)
            o.add(f"{r}.{norm}.out", rows, d)
        for name in ("q", "k", "v", "out", "to_out.out", "ff.out"):
            o.add(f"{r}.{name}", rows, d)
        o.add(f"{r}.lse", rows, model.num_heads, FP32)
        o.add(f"{r}.gates", rows, 2 * d)
        o.add(f"{r}.ff.hidden", rows, 4 * d)
        o.add(f"{r}.ff.act", rows, 4 * d)


def stream_activations(
    model: ModelShape,
    batch: MicroBatch,
    layout: Layout,
    e: int,
    text_rows: int,
    conditioning: Callable[[Kept], None],
    more_blocks: Callable[[Shards, Shards, tuple[Saved, ...]], list[BlockActivations]] = lambda v, t, i: [],
) -> Activations:
    """A visual and a text stream of ``text_rows`` rows, each sharded on its own, through the
    dual-stream blocks, then the family's ``more_blocks`` (given each stream's rows and the blocks'
    inputs); one modulation row per sample (``U = samples``:
    a sample denoised at one timestep; per-token timesteps add rows). ``conditioning`` adds what
    the family's embeddings keep outside the blocks beside the patch embedding and output layer
    (its modulation table, ``table``, and its text stream's embeddings)."""
    visual, text = Shards.of(batch.tokens, layout), Shards.of(text_rows, layout)
    d, samples = model.hidden_size, batch.samples
    streams = (("img", visual), ("txt", text))
    inputs = tuple(Saved(f"{stream}.x", rows.residual, d, e) for stream, rows in streams)
    blocks = [
        BlockActivations(
            "transformer_blocks",
            model.depth,
            dual_block(model, visual, text, layout, samples, e).saved(),
            inputs,
        )
    ]
    blocks += more_blocks(visual, text, inputs)
    o = Kept(e)
    conditioning(o)
    o.add("final.silu", samples, d)
    o.add("x_embedder.in", visual.sequence, model.in_features)
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
    return Activations(tuple(blocks), o.saved(), (), layout.activation_checkpointing, view)


# ----------------------------------------------------------------------------- collectives
def _linear(calls: CallPlan, where: str, parallel: str, numel: int, count: int, backward: int) -> None:
    """One column- or row-parallel linear on a stream's rows, run ``count`` times and reached by a
    gradient ``backward`` times (a stream's last use may reach no output)."""
    sp = calls.layout.sequence_parallel
    if parallel == "column" and sp:
        calls.add(where, "all_gather", "tp", numel, "forward", count)
        if backward:
            calls.add(where, "all_gather", "tp", numel, "backward", backward)
            calls.add(where, "reduce_scatter", "tp", numel, "backward", backward)
    elif parallel == "column":
        if backward:
            calls.add(where, "all_reduce", "tp", numel, "backward", backward)
    elif sp:
        calls.add(where, "reduce_scatter", "tp", numel, "forward", count)
        if backward:
            calls.add(where, "all_gather", "tp", numel, "backward", backward)
    else:
        calls.add(where, "all_reduce", "tp", numel, "forward", count)


def stream_tensor_parallel(calls: CallPlan, model: ModelShape, n: int, text: int) -> None:
    """Tensor-parallel collectives of the dual-stream blocks and the single-stream blocks after them
    (``model.single_blocks``), on ``n`` visual and ``text`` text rows of one rank.

    Per dual-stream block and stream: q, k, v and the first FFN linear column-parallel, the attention
    output and the second FFN linear row-parallel; per single-stream block and stream: q, k, v and
    ``proj_mlp`` column-parallel, ``proj_out`` row-parallel. The text stream's last feed-forward (and
    output projection) reaches no output, so it gets no gradient. Per-head QK norms see the rank's
    heads; under SP the modulation linears, the row biases and (outside) the timestep table see the
    rank's rows: their gradients are summed over TP."""
    d, depth, single = model.hidden_size, model.depth, model.single_blocks
    last = depth if single else depth - 1  # dual blocks whose text output reaches an output
    for name in ("to_q", "to_k", "to_v"):
        _linear(calls, f"block.attn.{name}", "column", n * d, depth, depth)
    for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
        _linear(calls, f"block.attn.{name}", "column", text * d, depth, depth)
    _linear(calls, "block.ff.net.0.proj", "column", n * d, depth, depth)
    _linear(calls, "block.ff_context.net.0.proj", "column", text * d, depth, last)
    for visual, text_name in (("attn.to_out.0", "attn.to_add_out"), ("ff.net.2", "ff_context.net.2")):
        _linear(calls, f"block.{visual}", "row", n * d, depth, depth)
        _linear(calls, f"block.{text_name}", "row", text * d, depth, last)
    if single:
        for stream, rows in (("img", n), ("txt", text)):
            used = single if stream == "img" else single - 1  # the text's last MLP and output: unused
            for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
                _linear(calls, f"block.single.{stream}.{name}", "column", rows * d, single, single)
            _linear(calls, f"block.single.{stream}.proj_mlp", "column", rows * d, single, used)
            _linear(calls, f"block.single.{stream}.proj_out", "row", rows * d, single, used)
    if model.qk_norm:
        calls.summed_gradients(
            (f"block.attn.{norm}", model.head_dim)
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
        )
        for norm in ("norm_q", "norm_k") if single else ():
            calls.add(f"block.single.attn.{norm}", "all_reduce", "tp", model.head_dim, "backward", single)
    if calls.layout.sequence_parallel:
        for norm in ("norm1", "norm1_context"):
            calls.summed_gradients(
                [(f"block.{norm}.linear.weight", 6 * d * d), (f"block.{norm}.linear.bias", 6 * d)]
            )
        calls.add("block.row_bias", "all_reduce", "tp", d, "backward", 2 * depth)
        if last:
            calls.add("block.text_row_bias", "all_reduce", "tp", d, "backward", 2 * last)
        for where, numel in (("block.single.norm.linear.weight", 3 * d * d), ("block.single.norm.linear.bias", 3 * d),
                             ("block.single.proj_out.bias", d)) if single else ():  # fmt: skip
            calls.add(where, "all_reduce", "tp", numel, "backward", single)


def stream_parallel_outside(calls: CallPlan, model: ModelShape, batch: MicroBatch, text_rows: int) -> None:
    """Under SP: both streams enter the blocks sharded over TP (their gradients all-gathered), the
    visual rows leave gathered; the per-sample timestep table every rank indexes by its rows has its
    gradient summed."""
    d, layout = model.hidden_size, calls.layout
    visual, text = Shards.of(batch.tokens, layout).sequence, Shards.of(text_rows, layout).sequence
    calls.add("embeddings", "all_gather", "tp", visual * d, "backward", 1)
    calls.add("text_stream", "all_gather", "tp", text * d, "backward", 1)
    calls.add("blocks_output", "all_gather", "tp", visual * d, "forward", 1)
    calls.add("table", "all_reduce", "tp", batch.samples * d, "backward", 1)


def joint_attention_rows(batch: MicroBatch, layout: Layout, text_rows: int) -> int:
    """The joint attention's rows on one CP rank: its visual shard and its text shard."""
    return Shards.of(batch.tokens, layout).sequence + Shards.of(text_rows, layout).sequence

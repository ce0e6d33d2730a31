"""HunyuanVideo 1.5's part of the cost model (:class:`~imontage.models.common.cost.FamilyCost`).

Its blocks are HunyuanVideo's dual-stream blocks (no single-stream ones), around the same token
refiner and output layer: :func:`imontage.models.common.dual_stream_cost.stream_activations`
keeps their terms. What differs is outside them: the modulation table is the timestep embedding alone, and the
text stream holds three kinds of rows per sample: Qwen2.5-VL text through the refiner, ByT5 glyph
text (``MicroBatch.text_tokens_2``) and, for I2V, the condition image's SigLIP tokens
(``MicroBatch.image_tokens``), each through its own projection. Its collectives are the dual-stream blocks' on that text stream
(:func:`~imontage.models.common.dual_stream_cost.stream_tensor_parallel`); adapters on every attention
and FFN linear of its blocks are modelled.
"""

from __future__ import annotations

from typing import Any

from imontage.models.common.cost import (
    Activations,
    CallPlan,
    FamilyCost,
    Kept,
    Layout,
    LoraCost,
    MicroBatch,
    ModelShape,
    Shards,
    patch_volume,
)
from imontage.models.common.dual_stream_cost import (
    FREQUENCIES,
    joint_attention_rows,
    mlp_embedding,
    refiner,
    stream_activations,
    stream_parallel_outside,
    stream_tensor_parallel,
)

# diffusers' HunyuanVideo15ImageToVideoPipeline.vision_num_semantic_tokens: SigLIP tokens of one image
SIGLIP_IMAGE_TOKENS = 729
GLYPH_HIDDEN = 2048  # the glyph-text projection's inner width (models/hunyuan_video_15/model.py)
VISUAL_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_LINEARS = (
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def shape(cfg: Any) -> dict[str, Any]:
    """Its output channels, refiner blocks, glyph-text width and, for I2V, its image tokens."""
    hv = cfg.hunyuan_video_15
    i2v = str(hv.task_type) == "i2v"
    return {
        "patch_features": int(hv.out_channels) * patch_volume(cfg),
        "refiner_blocks": int(hv.num_refiner_layers),
        "pooled_dim": int(hv.text_embed_2_dim),  # the glyph-text embeddings' width
        "image_dim": int(hv.image_embed_dim) if i2v else 0,
        "image_tokens": SIGLIP_IMAGE_TOKENS if i2v else 0,
    }


def text_rows(model: ModelShape, batch: MicroBatch) -> int:
    """Rows of the text stream: Qwen and glyph text, and I2V's image tokens."""
    return batch.text_tokens + (batch.image_tokens if model.image_dim else 0)


def activations(model: ModelShape, batch: MicroBatch, layout: Layout, e: int) -> Activations:
    """One table row per sample (the timestep embedding); the refiner on the Qwen rows, an MLP on
    the glyph rows (LayerNorm, three linears) and on the image rows (LayerNorm, two linears,
    LayerNorm), whole on every rank."""
    samples, d = batch.samples, model.hidden_size
    glyph = batch.text_tokens_2
    image = batch.image_tokens if model.image_dim else 0

    def conditioning(o: Kept) -> None:
        mlp_embedding(o, "cond.time", samples, FREQUENCIES, d)
        o.add("table", samples, d)  # the timestep embedding itself: every modulation's SiLU input
        refiner(o, model, batch.text_tokens - glyph, samples)
        o.add("glyph.in", glyph, model.pooled_dim)
        o.stats("glyph.norm", glyph)
        o.add("glyph.norm.out", glyph, model.pooled_dim)
        for name in ("hidden_1", "act_1", "hidden_2", "act_2"):  # GELUs' inputs, linears' inputs
            o.add(f"glyph.{name}", glyph, GLYPH_HIDDEN)
        o.add("image.in", image, model.image_dim)
        o.stats("image.norm_in", image)
        for name in ("image.norm_in.out", "image.hidden", "image.act"):
            o.add(name, image, model.image_dim)
        o.add("image.out", image, d)  # norm_out's input
        o.stats("image.norm_out", image)

    return stream_activations(model, batch, layout, e, text_rows(model, batch), conditioning)


def tensor_parallel(calls: CallPlan, model: ModelShape, n: int, batch: MicroBatch) -> None:
    """Its dual-stream blocks' collectives (:func:`stream_tensor_parallel`) on its text stream."""
    stream_tensor_parallel(calls, model, n, Shards.of(text_rows(model, batch), calls.layout).sequence)


def sequence_parallel_outside(calls: CallPlan, model: ModelShape, batch: MicroBatch) -> None:
    stream_parallel_outside(calls, model, batch, text_rows(model, batch))


def attention_rows(model: ModelShape, batch: MicroBatch, layout: Layout) -> int:
    return joint_attention_rows(batch, layout, text_rows(model, batch))


def lora_rows(model: ModelShape, batch: MicroBatch, layout: Layout) -> dict[str, int]:
    """The text stream's linears read one rank's shard of the text stream."""
    return dict.fromkeys(TEXT_LINEARS, Shards.of(text_rows(model, batch), layout).sequence)


_STREAMS = ("img", "txt")
COST = FamilyCost(
    shape=shape,
    activations=activations,
    tensor_parallel=tensor_parallel,
    attention="block.attn",
    attention_rows=attention_rows,
    sequence_parallel_outside=sequence_parallel_outside,
    lora=LoraCost(
        block_linears=VISUAL_LINEARS + TEXT_LINEARS,
        # The modulation is frozen and reads the frozen table: its SiLU keeps nothing, and the
        # products with it keep only it.
        dropped=("modulation.silu",)
        + tuple(f"{s}.{name}" for s in _STREAMS for name in ("norm1.out", "norm2.out", "attn.out", "ff.out")),
        outside=("final.x", "final.norm.stats", "final.scale"),
        rows=lora_rows,
        blocks="transformer_blocks",
        first_dropped=tuple(f"{s}.norm1.{name}" for s in _STREAMS for name in ("x", "stats", "scale")),
    ),
)

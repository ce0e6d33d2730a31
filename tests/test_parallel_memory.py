"""tools/plan.py's memory estimate: parameter bytes by hand, activations against what autograd keeps.

The activation estimate assumes the GPU kernels (flash attention, the fused RoPE and QK-norm + RoPE
kernels, the fused RMSNorm and LayerNorm). On CPU, :func:`gpu_kernel_savings` runs the same
arithmetic but saves for the backward pass what those kernels save, so a CPU forward pass keeps
what a GPU one would; every other op (linears, casts, modulation, GELU) is the model's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from omegaconf import OmegaConf
from torch import nn

from imontage.config.schema import ModelConfig
from imontage.cost import (
    PRECISIONS,
    Layout,
    MicroBatch,
    PlanError,
    activations,
    communication_plan,
    count_saved_tensors,
    estimate_memory,
    lora_blocks,
    model_shape,
    parameter_census,
    zero3_traffic,
)
from imontage.models import build_model, packing_spec
from imontage.models.common import PackedBatch, Sample, Segment, pack_samples
from imontage.models.common.experts import TimestepExperts
from imontage.parallel.engine import block_numel


def preset(name: str) -> Any:
    path = REPO / "configs" / "model" / f"{name}.yaml"
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))


# ------------------------------------------------------------- what the GPU kernels save, on CPU
class _Saving(torch.autograd.Function):
    """Runs ``compute`` without recording it and saves ``keep(inputs, outputs)`` instead."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., Any], keep: Callable[..., tuple], *inputs: Any) -> Any:
        with torch.no_grad():
            out = compute(*inputs)
        ctx.save_for_backward(*keep(inputs, out))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise NotImplementedError("gpu_kernel_savings is for counting what a forward pass keeps")


def _fp32_rows(x: torch.Tensor, width: int = 1) -> torch.Tensor:
    return torch.empty(*x.shape[:-1], width, dtype=torch.float32)


@contextlib.contextmanager
def gpu_kernel_savings() -> Iterator[None]:
    """Attention, RoPE, RMSNorm and LayerNorm save what their CUDA kernels save (module docstring).

    flash-attn: q, k, v, out and the fp32 log-sum-exp ``[h, n]``; the RoPE kernel: the positions;
    the fused QK-norm + RoPE kernel: q, k, both weights and the positions; CUDA's fused RMSNorm:
    input, fp32 rstd, weight; CUDA's LayerNorm: input, fp32 mean and rstd, weight, bias.
    """
    import imontage.models.common.attention as common_attention
    import imontage.models.common.dual_stream as dual_stream
    import imontage.models.common.rope as rope
    import imontage.models.wan.model as wan_model

    # CoreAttention (the DiT's and Wan's self-attention) calls it in its module; the families'
    # other attentions call it where they import it.
    attention_users = [
        m for m in (common_attention, wan_model, dual_stream) if hasattr(m, "varlen_attention")
    ]
    originals = {
        **{(m, "varlen_attention"): m.varlen_attention for m in attention_users},
        (rope, "multi_axis_rope"): rope.multi_axis_rope,
        (rope, "qk_norm_rope"): rope.qk_norm_rope,
        (F, "rms_norm"): F.rms_norm,
        (F, "layer_norm"): F.layer_norm,
    }
    attend, rotate = originals[(common_attention, "varlen_attention")], originals[(rope, "multi_axis_rope")]
    qk_rotate, rms_norm, layer_norm = rope.qk_norm_rope, F.rms_norm, F.layer_norm

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        def keep(inputs: tuple, out: torch.Tensor) -> tuple:
            return (*inputs, out, torch.empty(q.shape[1], q.shape[0], dtype=torch.float32))

        return _Saving.apply(lambda *t: attend(*t, *args, **kwargs), keep, q, k, v)

    def multi_axis_rope(
        q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        return _Saving.apply(lambda *t: rotate(*t, *args, **kw), lambda i, o: (i[2],), q, k, positions)

    def qk_norm_rope(q: Any, k: Any, wq: Any, wk: Any, positions: Any, *args: Any, **kw: Any) -> Any:
        return _Saving.apply(lambda *t: qk_rotate(*t, *args, **kw), lambda i, o: i, q, k, wq, wk, positions)

    # The weights are inputs of the Function: a norm of a tensor that needs no gradient (the
    # batch's) still saves for its weight's gradient.
    def rms(x: torch.Tensor, shape: Any, weight: Any = None, eps: Any = None) -> Any:
        def keep(inputs: tuple, out: torch.Tensor) -> tuple:
            return (x, _fp32_rows(x), *inputs[1:])

        params = [weight] if weight is not None else []
        return _Saving.apply(lambda x, *w: rms_norm(x, shape, weight, eps), keep, x, *params)

    def layer(x: torch.Tensor, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
        def keep(inputs: tuple, out: torch.Tensor) -> tuple:
            return (x, _fp32_rows(x), _fp32_rows(x), *inputs[1:])

        params = [t for t in (weight, bias) if t is not None]
        return _Saving.apply(lambda x, *p: layer_norm(x, shape, weight, bias, eps), keep, x, *params)

    replacements = {"multi_axis_rope": multi_axis_rope, "qk_norm_rope": qk_norm_rope}
    replacements |= {"rms_norm": rms, "layer_norm": layer, "varlen_attention": attention}
    for owner, name in originals:
        setattr(owner, name, replacements[name])
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def batch_tensors(batch: PackedBatch) -> list[torch.Tensor]:
    """The batch's own tensors: the data pipeline's memory, not the step's."""
    fields = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    return [value for value in fields if isinstance(value, torch.Tensor)]


def block_scopes(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    names = ("blocks", "transformer_blocks", "single_transformer_blocks")
    lists = [(name, getattr(model, name, None)) for name in names]  # HunyuanVideo's blocks() is a method
    return {
        f"{name}.{i}": b
        for name, blocks in lists
        if isinstance(blocks, nn.ModuleList)
        for i, b in enumerate(blocks)
    }


def measured_activations(model: torch.nn.Module, batch: PackedBatch) -> dict[str, int]:
    """Bytes autograd keeps per block (``blocks.0``, ...) and ``outside`` them, for one forward pass
    (of a model of experts: the blocks of the expert the batch runs)."""
    network = (
        model.get_submodule(model.routed_expert(batch).name) if isinstance(model, TimestepExperts) else model
    )
    with (
        gpu_kernel_savings(),
        count_saved_tensors(model, block_scopes(network), batch_tensors(batch)) as saved,
    ):
        model(batch)
    return saved.by_scope()


def expected_by_scope(kept: Any, scopes: list[str]) -> dict[str, int]:
    """The estimate's bytes for the scopes of :func:`measured_activations` (no checkpointing)."""
    blocks = {b.name: b for b in kept.blocks}
    expected = {"outside": kept.outside_bytes}
    for scope in scopes:
        name, index = scope.rsplit(".", 1)
        expected[scope] = blocks[name].first_bytes if index == "0" else blocks[name].bytes
    expected[f"{kept.blocks[0].name}.0"] += kept.view_bytes  # the first block keeps the whole embedding
    return expected


# ------------------------------------------------------------------------------ tiny models and batches
def wan_case(variant: str) -> tuple[Any, Any, PackedBatch, MicroBatch]:
    """Wan: the shipped tiny preset (T2V, text padded to 16) or test_wan's tiny I2V; three samples."""
    from test_wan import Variant, imontage_config, make_case, pack

    cfg = preset("wan_tiny") if variant == "t2v" else imontage_config(Variant("i2v", text_len=12, i2v=True))
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(3)
    shapes, texts = [(1, 4, 4), (3, 4, 6), (1, 6, 2)], (3, 9, 5)
    cases = [
        make_case(gen, shape, n, variant == "i2v", per_token=True)
        for shape, n in zip(shapes, texts, strict=True)
    ]
    batch = pack(cases, model)
    image = batch.image_embeds.shape[0] * batch.image_embeds.shape[1] if batch.image_embeds is not None else 0
    rows = MicroBatch(int((~batch.is_text).sum()), int(batch.is_text.sum()), batch.num_samples, image)
    return cfg, model, batch, rows


def wan_experts_case() -> tuple[Any, Any, PackedBatch, MicroBatch]:
    """Both experts of a tiny Wan 2.2 A14B in one model (``model.expert`` unset), on :func:`wan_case`'s
    T2V batch with every noised timestep below the boundary: the low-noise expert (transformer_2) runs it."""
    cfg, _, batch, rows = wan_case("t2v")
    cfg = OmegaConf.merge(cfg, {"wan": {"boundary_ratio": 0.875}})
    batch = batch.replace(timesteps=batch.timesteps * 0.8)
    torch.manual_seed(0)
    return cfg, build_model(cfg), batch, rows


def dit_case() -> tuple[Any, Any, PackedBatch, MicroBatch]:
    from conftest import tiny_model_config
    from test_parallelize import uneven_batch

    cfg = tiny_model_config()
    torch.manual_seed(0)
    batch = uneven_batch("montage")
    batch = batch.replace(tokens=batch.tokens.detach())
    rows = MicroBatch(int((~batch.is_text).sum()), int(batch.is_text.sum()), batch.num_samples)
    return cfg, build_model(cfg), batch, rows


def hunyuan_case() -> tuple[Any, Any, PackedBatch, MicroBatch]:
    """The shipped tiny HunyuanVideo (1 dual + 1 single block), three T2V samples, one timestep each."""
    cfg = preset("hunyuan_video_tiny")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    samples = [
        Sample(
            [
                Segment("text", data=torch.randn(n, cfg.text_dim, generator=gen)),
                Segment("video", "target", torch.randn(cfg.in_channels, *shape, generator=gen)),
            ],
            pooled_text=torch.randn(cfg.hunyuan_video.pooled_projection_dim, generator=gen),
            guidance=3.0,
        )
        for shape, n in zip([(1, 4, 4), (3, 4, 6), (1, 6, 2)], (3, 9, 5), strict=True)
    ]
    batch = pack_samples(samples, packing_spec(cfg))
    t = torch.tensor([0.2, 0.5, 0.8])[batch.sample_index()]
    batch = batch.replace(timesteps=torch.where(batch.target_mask, t, 0.0))
    rows = MicroBatch(int((~batch.is_text).sum()), int(batch.is_text.sum()), batch.num_samples)
    return cfg, build_model(cfg), batch, rows


def hunyuan_15_case() -> tuple[Any, Any, PackedBatch, MicroBatch]:
    """The shipped tiny HunyuanVideo 1.5 I2V (2 dual-stream blocks), three samples with Qwen text,
    glyph text (two of them) and image tokens, one timestep each."""
    import test_hunyuan_video_15 as hv15

    cfg = preset("hunyuan_video_1.5_tiny")
    gen = torch.Generator().manual_seed(3)
    shapes, texts, glyphs = [(1, 4, 4), (3, 4, 6), (1, 6, 2)], (3, 9, 5), (2, 0, 4)
    cases = [
        hv15.Case(gen, *shape, text_len=n, glyph_len=g, t=t)
        for shape, n, g, t in zip(shapes, texts, glyphs, (0.2, 0.5, 0.8), strict=True)
    ]
    batch = hv15.packed(cases)
    assert batch.text_encoder is not None and batch.image_embeds is not None
    glyph = int((batch.is_text & (batch.text_encoder == 1)).sum())
    image = batch.image_embeds.shape[0] * batch.image_embeds.shape[1]
    rows = MicroBatch(int((~batch.is_text).sum()), int(batch.is_text.sum()), batch.num_samples, image, glyph)
    torch.manual_seed(0)
    return cfg, build_model(cfg), batch, rows


CASES = {
    "dit": dit_case,
    "wan_t2v": lambda: wan_case("t2v"),
    "wan_i2v": lambda: wan_case("i2v"),
    "wan_experts": wan_experts_case,
    "hunyuan_video": hunyuan_case,
    "hunyuan_video_15": hunyuan_15_case,
}
# Adapters on every attention and FFN linear of the blocks (docs/lora.md's recipe; I2V: the image ones too).
LORA_TARGETS = {
    "dit": ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"],
    "wan_t2v": ["blocks.*.attn1.to_*", "blocks.*.attn2.to_*", "blocks.*.ffn.net.*"],
    "wan_i2v": ["blocks.*.attn1.to_*", "blocks.*.attn2.to_*", "blocks.*.attn2.add_*", "blocks.*.ffn.net.*"],
    "wan_experts": [
        "transformer*.blocks.*.attn1.to_*",
        "transformer*.blocks.*.attn2.to_*",
        "transformer*.blocks.*.ffn.net.*",
    ],
    "hunyuan_video_15": ["transformer_blocks.*.attn.*", "transformer_blocks.*.ff*.net.*"],
}


def lora_case(case: str, rank: int = 3, **lora: Any) -> tuple[Any, Any, PackedBatch, MicroBatch]:
    """``CASES[case]`` with ``model.lora``: the same base weights, frozen, and adapters on LORA_TARGETS."""
    cfg, _, batch, rows = CASES[case]()
    cfg = OmegaConf.merge(cfg, {"lora": {"rank": rank, "targets": LORA_TARGETS[case], **lora}})
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, param in model.named_parameters():  # B starts at 0: give the adapters an update
        if name.endswith("lora_B.weight"):
            torch.nn.init.normal_(param, std=0.1)
    return cfg, model, batch, rows


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_estimate_equals_what_autograd_keeps(case: str, precision: str) -> None:
    cfg, model, batch, rows = CASES[case]()
    e = PRECISIONS[precision].activation_bytes
    model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    measured = measured_activations(model, batch)
    kept = activations(model_shape(cfg), rows, Layout(), e)
    expected = expected_by_scope(kept, [s for s in measured if s != "outside"])
    if precision == "fp32":  # there the model reads some of the batch's own fp32 tensors in place
        measured.pop("outside"), expected.pop("outside")
    assert measured == expected
    # Checkpointed: outside, the inputs the blocks share and each one's own, and one block run again.
    shape = model_shape(cfg)
    checkpointed = activations(shape, rows, Layout(activation_checkpointing=True), e)
    residual = {"wan": rows.tokens, "dit": rows.tokens + rows.text_tokens}.get(
        case.split("_")[0],
        rows.tokens + rows.text_tokens + rows.image_tokens,  # both HunyuanVideo streams
    )
    own = sum(b.count * b.input_bytes for b in checkpointed.blocks)
    assert own == (shape.depth + shape.single_blocks) * residual * shape.hidden_size * e
    shared = sum(s.bytes for s in checkpointed.shared_inputs)
    modulation_rows = 0 if case.startswith("hunyuan") else residual  # HunyuanVideo's rows index one table
    assert shared == modulation_rows * 6 * shape.hidden_size * e
    largest = max(v for k, v in measured.items() if k != "outside")
    assert checkpointed.peak == kept.outside_bytes + shared + own + largest


@pytest.mark.parametrize(
    "case, precision",
    [
        ("dit", "bf16"),
        ("wan_t2v", "bf16"),
        ("wan_t2v", "fp32"),
        ("wan_i2v", "bf16"),
        ("wan_experts", "bf16"),
        ("hunyuan_video_15", "bf16"),
        ("hunyuan_video_15", "fp32"),
    ],
)
def test_lora_activation_estimate_equals_what_autograd_keeps(case: str, precision: str) -> None:
    """A frozen base with adapters: exact per block (block 0 apart: its input needs no gradient)
    and outside the blocks, and smaller than full fine-tuning's by what the frozen weights needed."""
    cfg, model, batch, rows = lora_case(case)
    e = PRECISIONS[precision].activation_bytes
    model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    measured = measured_activations(model, batch)
    shape = model_shape(cfg)
    kept = activations(shape, rows, Layout(), e)
    expected = expected_by_scope(kept, [s for s in measured if s != "outside"])
    if precision == "fp32":  # as above: the batch's own fp32 tensors are read in place
        measured.pop("outside"), expected.pop("outside")
    assert measured == expected
    blocks = lora_blocks(shape)
    assert measured[f"{blocks}.0"] < measured[f"{blocks}.1"]  # the first block keeps nothing for its input
    full = activations(dataclasses.replace(shape, lora_rank=0), rows, Layout(), e)
    assert kept.peak < full.peak
    # Each adapter adds its h = A x [rows, rank]: rank 6 keeps 3 more elements per adapted row.
    wider = activations(dataclasses.replace(shape, lora_rank=6), rows, Layout(), e)
    adapted_rows = sum(s.rows for s in kept.blocks[0].saved if s.name.endswith(".lora_h"))
    assert wider.blocks[0].bytes - kept.blocks[0].bytes == adapted_rows * 3 * e


# ------------------------------------------------------------------------- parameters, by hand
def wan_tiny_cut_per_block(cfg: Any) -> int:
    """Elements Wan's tensor parallelism cuts in one block (they split evenly over TP ranks):
    attn1 and attn2 to_q, to_k, to_v (weights, biases), to_out.0 weights, the norms across heads;
    the FFN's first linear (weight, bias) and second weight."""
    d, f = cfg.hidden_size, cfg.mlp_hidden_size
    attention = 3 * (d * d + d) + d * d + 2 * d
    return 2 * attention + (f * d + f) + d * f


def test_parameter_bytes_of_the_tiny_wan_by_hand() -> None:
    cfg = preset("wan_tiny")
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    cut = wan_tiny_cut_per_block(cfg)
    # TP 2 on 2 GPUs: ZeRO over 1 rank, so each TP rank's share is its whole partition.
    share, block_share = total - cfg.depth * cut // 2, block - cut // 2
    shape, rows = model_shape(cfg), MicroBatch(tokens=64, text_tokens=8)
    estimate = estimate_memory(model, shape, rows, Layout(tensor=2, world=2))
    terms = dict(estimate.terms())
    assert estimate.census.rank == share and estimate.census.block == block_share
    assert terms["bf16 weights, ZeRO-3 partition"] == 2 * share
    assert terms["bf16 gradients, ZeRO-3 partition"] == 2 * share
    assert terms["fp32 master weights"] == 4 * share
    assert terms["fp32 Adam moments"] == 8 * share
    assert terms["fp32 EMA"] == 4 * share
    assert terms["bf16 weights gathered (≤ 3 blocks live)"] == 2 * min(3 * block_share, share)
    assert terms["gradient reduce bucket (1 block)"] == 2 * block_share
    states = 20 * share + 2 * min(3 * block_share, share) + 2 * block_share
    assert estimate.total == states + terms["activations (peak)"]
    # 8 GPUs at TP 2: ZeRO over the other 4; each parameter's partition is rounded up on its own.
    wide = parameter_census(model, Layout(tensor=2, world=8))
    split = {name: tensor_share(name, p, 2) for name, p in model.named_parameters()}
    assert wide.trainable == sum(math.ceil(n / 4) for n in split.values()) and wide.frozen == 0
    # ZeRO-3's own traffic per micro-batch, one rank of 4, ring: (4 − 1)/4 of each bf16 gather
    # (forward and backward) and of the gradient reduce-scatter.
    traffic = zero3_traffic(wide, Layout(tensor=2, world=8), PRECISIONS["bf16"])
    assert traffic == {"all_gather": 2 * share * 2 * 3 / 4, "reduce_scatter": share * 2 * 3 / 4}
    # fp32 training: the working copy is the master copy (DeepSpeed keeps no second one), no EMA.
    fp32 = dict(estimate_memory(model, shape, rows, Layout(world=1), PRECISIONS["fp32"], ema=False).terms())
    assert fp32["fp32 master weights"] == 0 and fp32["fp32 EMA"] == 0
    assert fp32["fp32 weights, ZeRO-3 partition"] == 4 * total == fp32["fp32 gradients, ZeRO-3 partition"]


def tensor_share(name: str, param: torch.Tensor, tensor: int) -> int:
    from imontage.parallel.parallelize import tensor_split

    split = tensor_split(name)
    return param.numel() // tensor if split is not None else param.numel()


def test_zero3_shards_over_data_and_context_ranks() -> None:
    """The engine's ZeRO group is DP × CP (MegatronMPU): Ulysses ranks shard parameters too."""
    model = build_model(preset("wan_tiny"), device="meta")
    ulysses = parameter_census(model, Layout(context=2, world=8))
    assert Layout(context=2, world=8).zero == 8
    assert ulysses.trainable == sum(math.ceil(p.numel() / 8) for p in model.parameters())


def test_frozen_parameters_cost_only_their_working_copy() -> None:
    """What a frozen base (adapters trained alone) saves: no gradient, master copy or moments."""
    cfg = preset("wan_tiny")
    model = build_model(cfg, device="meta")
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("scale_shift_table"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    terms = dict(estimate_memory(model, model_shape(cfg), MicroBatch(64), Layout(world=1)).terms())
    total = sum(p.numel() for p in model.parameters())
    assert terms["bf16 weights, ZeRO-3 partition"] == 2 * total
    assert terms["bf16 gradients, ZeRO-3 partition"] == 2 * trained
    assert terms["fp32 Adam moments"] == 8 * trained and terms["fp32 master weights"] == 4 * trained


@pytest.mark.parametrize("name", ["dit_tiny", "wan_tiny", "hunyuan_video_tiny", "hunyuan_video_1.5_tiny"])
def test_bucket_unit_is_the_engines(name: str) -> None:
    """The estimate sizes ZeRO's buckets as zero3_config does (the largest block of the family's
    block lists, HunyuanVideo's dual- and single-stream ones both, else the whole model)."""
    model = build_model(preset(name), device="meta")
    assert parameter_census(model, Layout()).block == block_numel(model)


def test_two_experts_in_one_run_shard_both_and_a_step_runs_one() -> None:
    """Both experts of Wan 2.2 A14B in one ZeRO-3 engine: every term that partitions (weights,
    gradients, master copy, moments) holds both experts, what a step gathers, buckets, exchanges and
    keeps is one expert's (the engine's own bucket size; the activations of one network)."""
    cfg = OmegaConf.merge(preset("wan_tiny"), {"wan": {"boundary_ratio": 0.875}})
    both = build_model(cfg, device="meta")
    one = build_model(OmegaConf.merge(cfg, {"expert": "transformer_2"}), device="meta")
    assert isinstance(both, TimestepExperts)
    shape, rows = model_shape(cfg), MicroBatch(64, 8)
    for layout in (
        Layout(world=4),
        Layout(tensor=2, sequence_parallel=True, world=4),
        Layout(context=2, world=4),
    ):
        pair, single = (estimate_memory(m, shape, rows, layout) for m in (both, one))
        assert pair.census.networks == 2 and single.census.networks == 1
        assert (
            pair.census.rank == 2 * single.census.rank
            and pair.census.trainable == 2 * single.census.trainable
        )
        assert pair.census.step_rank == single.census.rank and pair.census.block == single.census.block
        terms, alone = dict(pair.terms()), dict(single.terms())
        for name, value in terms.items():
            doubled = "partition" in name or name.startswith(
                "fp32"
            )  # weights, gradients, master, moments, EMA
            assert value == (2 * alone[name] if doubled else alone[name]), (layout, name)
        assert zero3_traffic(pair.census, layout, pair.precision) == zero3_traffic(
            single.census, layout, pair.precision
        )
    assert parameter_census(both, Layout()).block == block_numel(both)  # the engine's bucket


def test_layouts_the_model_cannot_take_are_refused() -> None:
    cfg = preset("wan_tiny")
    model = build_model(cfg, device="meta")
    with pytest.raises(
        ValueError, match="num_heads=2 is not divisible by tensor_parallel × context_parallel = 4 × 1"
    ):
        parameter_census(model, Layout(tensor=4, world=4))
    with pytest.raises(
        PlanError, match="num_heads=2 is not divisible by tensor_parallel × context_parallel = 1 × 4"
    ):
        estimate_memory(model, model_shape(cfg), MicroBatch(64), Layout(context=4))
    with pytest.raises(PlanError, match="sequence_parallel needs tensor_parallel > 1"):
        Layout(sequence_parallel=True)
    with pytest.raises(
        PlanError, match="6 GPUs do not divide into tensor_parallel × context_parallel = 4 × 1"
    ):
        Layout(tensor=4, world=6)


def test_plan_refuses_families_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_parallel_plan import without_communication_plan

    shape = model_shape(preset("hunyuan_video_i2v_13b"))
    without_communication_plan(monkeypatch, "hunyuan_video")  # a family that comes without one
    with pytest.raises(PlanError, match="no communication plan for model family 'hunyuan_video'"):
        communication_plan(shape, MicroBatch(1024, 256), Layout(tensor=2))
    assert communication_plan(shape, MicroBatch(1024, 256), Layout(world=8)) == []  # nothing inside the model
    cfg = OmegaConf.merge(preset("dit_tiny"), {"family": "flux"})
    with pytest.raises(PlanError, match="model.family 'flux' is not one the plan knows"):
        model_shape(cfg)


def test_lora_memory_terms_and_the_cases_not_modelled() -> None:
    """A frozen base: the ZeRO-3 terms follow requires_grad, except the two DeepSpeed sizes by the
    whole block (the reduce bucket is allocated at reduce_bucket_size, the gathers fetch the frozen
    weights too); the cases whose activations are not modelled are refused, not guessed."""
    cfg = OmegaConf.merge(preset("wan_tiny"), {"lora": {"rank": 4, "targets": LORA_TARGETS["wan_t2v"]}})
    shape, module = model_shape(cfg), build_model(cfg, device="meta")
    estimate = estimate_memory(module, shape, MicroBatch(64, 8), Layout(world=2))
    census, terms = estimate.census, dict(estimate.terms())
    adapters = sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)
    assert census.rank_trainable == adapters and 0 < census.trainable < census.frozen
    assert terms["bf16 gradients, ZeRO-3 partition"] == 2 * census.trainable
    assert terms["gradient reduce bucket (1 block)"] == 2 * block_numel(module)  # frozen weights included
    gathered = min(3 * block_numel(module), sum(p.numel() for p in module.parameters()))  # the frozen too
    assert terms["bf16 weights gathered (≤ 3 blocks live)"] == 2 * gathered
    traffic = zero3_traffic(census, Layout(world=2), PRECISIONS["bf16"])
    assert traffic["reduce_scatter"] == census.rank_trainable * 2 / 2  # only the adapters' gradients
    assert traffic["all_gather"] == 2 * census.rank * 2 / 2  # every weight, forward and backward
    refused = {
        "under tensor parallelism": (cfg, Layout(tensor=2)),
        "dropout=0.1": (OmegaConf.merge(cfg, {"lora": {"dropout": 0.1}}), Layout()),
        "trainable": (OmegaConf.merge(cfg, {"lora": {"trainable": ["proj_out.*"]}}), Layout()),
    }
    for message, (variant, layout) in refused.items():
        with pytest.raises(PlanError, match=f"does not model .*{message}"):
            activations(model_shape(variant), MicroBatch(64), layout, 2)
    hunyuan = OmegaConf.merge(preset("hunyuan_video_tiny"), {"lora": {"rank": 4, "targets": ["*.attn.to_q"]}})
    with pytest.raises(PlanError, match="adapters on the hunyuan_video family"):
        activations(model_shape(hunyuan), MicroBatch(64, 8), Layout(), 2)
    with pytest.raises(PlanError, match="model.lora is set: the adapters' own collectives"):
        communication_plan(shape, MicroBatch(64), Layout(tensor=2))
    # Other targets than the modelled ones are refused, naming a layer they adapt or leave out.
    for targets, layer in ((["blocks.*.attn1.to_q"], "leave out blocks.0.attn1.to_k"), (["*"], "also adapt")):
        odd = OmegaConf.merge(preset("wan_tiny"), {"lora": {"rank": 4, "targets": targets}})
        with pytest.raises(PlanError, match=layer):
            estimate_memory(build_model(odd, device="meta"), model_shape(odd), MicroBatch(64), Layout())

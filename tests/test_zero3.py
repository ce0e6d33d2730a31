"""ZeRO-3 over 2 data-parallel gloo ranks trains like one process on the same global batch."""

import pytest
import torch
from conftest import tiny_model_config
from distributed import run_ranks

from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.dit.model import DiT
from imontage.objectives.flow_matching import FlowMatching
from imontage.parallel.engine import block_numel, zero3_config

STEPS, LR, CLIP = 10, 3e-3, 1.0


def micro_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    sizes = [(8, 8), (8, 12)] if rank == 0 else [(12, 8)]  # the ranks' batches differ in size and count
    samples = [Sample([Segment("text", text=f"sample {step}"), Segment("image", "condition", torch.randn(3, 1, h, w, generator=g)),
                       Segment("image", "target", torch.randn(3, 1, h, w, generator=g))]) for h, w in sizes]  # fmt: skip
    return pack_samples(samples, packing_spec(tiny_model_config()))


def loss_of(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    return FlowMatching()(model, micro_batch(step, rank), torch.Generator().manual_seed(step * 7 + rank)).loss


def fresh_model(lora: bool = False) -> DiT:
    """The tiny DiT; with ``lora``, frozen, with adapters on its attention and MLP linears."""
    torch.manual_seed(0)
    model = DiT(tiny_model_config())
    with torch.no_grad():  # leave adaLN-zero's zeros so that every parameter trains from step 1
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    if lora:
        from imontage.models.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(rank=2, targets=["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc*"]))
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def zero3_losses(rank: int, world_size: int, lora: bool) -> list[float]:
    import deepspeed

    from imontage.parallel.engine import build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    model = fresh_model(lora)
    config = zero3_config(model, grad_clip=CLIP)
    engine = build_engine(model, torch.optim.AdamW(trainable(model), lr=LR), config)
    losses = []
    for step in range(STEPS):
        loss = loss_of(engine, step, rank)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world_size)
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_dp2_matches_one_process(lora: bool) -> None:
    """With LoRA only the adapters train (the optimiser holds them alone), on both sides."""
    ranks = run_ranks(zero3_losses, 2, lora, timeout=300)
    model = fresh_model(lora)
    optimizer = torch.optim.AdamW(trainable(model), lr=LR)
    expected = []
    for step in range(STEPS):
        loss = (loss_of(model, step, 0) + loss_of(model, step, 1)) / 2  # DP averages the ranks' gradients
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert ranks[0] == ranks[1]
    assert ranks[0] == pytest.approx(expected, rel=1e-5)
    assert expected[-1] < expected[0]  # it trained


def test_zero3_config_is_sized_from_the_model() -> None:
    model = DiT(tiny_model_config())
    config = zero3_config(model, grad_clip=0.5, precision="bf16", gradient_accumulation_steps=4)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and config["bf16"]["enabled"] and config["gradient_accumulation_steps"] == 4
    assert (
        zero["stage3_prefetch_bucket_size"]
        == block_numel(model)
        == sum(p.numel() for p in model.blocks[0].parameters())
    )
    assert zero["stage3_param_persistence_threshold"] >= model.blocks[0].modulation.numel()


@pytest.mark.parametrize("preset", ["wan_tiny", "hunyuan_video_tiny"])
def test_zero3_buckets_hold_the_largest_block_of_every_family(preset: str) -> None:
    """HunyuanVideo keeps its blocks in two lists (dual- and single-stream), Wan in ``blocks``:
    each is sized by its largest block, not by the whole model."""
    from conftest import REPO
    from omegaconf import OmegaConf

    from imontage.config.schema import ModelConfig
    from imontage.models import build_model
    from imontage.parallel.engine import transformer_blocks

    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / f"configs/model/{preset}.yaml")
    )
    model = build_model(cfg, device="meta")
    blocks = transformer_blocks(model)
    assert len(blocks) == int(cfg.depth) + (
        int(cfg.hunyuan_video.num_single_layers) if "hunyuan" in preset else 0
    )
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    zero = zero3_config(model, grad_clip=1.0)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == largest
    assert largest < sum(p.numel() for p in model.parameters()) / 2
    assert zero["stage3_param_persistence_threshold"] == 1  # resident vectors: the DiT's only (engine.py)

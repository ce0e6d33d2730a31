"""LoRA and partial fine-tuning on one device (imontage.models.lora), for the DiT, Wan, HunyuanVideo (1.5).

A fresh adapter (B = 0) leaves the outputs unchanged; merged weights give base + adapters' outputs;
only adapters and the listed trainable parameters receive gradients; bad patterns are named.
The parallel layouts with adapters are in tests/test_parallel_families.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_parallel_families as families
import test_parallelize as dit
import torch
from omegaconf import OmegaConf

from imontage.models.lora import LoraConfig, adapter_state_dict, apply_lora, is_adapter, merge_lora

# Every linear of the blocks a user adapts: attention (self and cross) and FFN of each family.
TARGETS = {
    "dit": ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"],
    "wan": ["blocks.*.attn1.to_*", "blocks.*.attn2.to_*", "blocks.*.attn2.add_*", "blocks.*.ffn.net.*"],
    "hunyuan_video": ["transformer_blocks.*.attn.*", "transformer_blocks.*.ff*.net.*",
                      "single_transformer_blocks.*.attn.to_*", "single_transformer_blocks.*.proj_*"],
    "hunyuan_video_15": ["transformer_blocks.*.attn.*", "transformer_blocks.*.ff*.net.*"],
}  # fmt: skip
TRAINABLE = {
    "dit": ["final.*"],
    "wan": ["condition_embedder.image_embedder.*"],
    "hunyuan_video": ["x_embedder.*"],
    "hunyuan_video_15": ["image_embedder.*"],
}


def lora_config(family: str, **changes: Any) -> Any:
    values = {"rank": 4, "alpha": 8.0, "targets": TARGETS[family], "trainable": TRAINABLE[family], **changes}
    return OmegaConf.merge(OmegaConf.structured(LoraConfig), values)


def model_and_batch(family: str) -> tuple[Any, Any]:
    if family == "dit":
        model = dit.reference_model("montage")
        return model, dit.uneven_batch("montage")
    variant = {"wan": "i2v", "hunyuan_video": "i2v_latent_concat", "hunyuan_video_15": "i2v"}[family]
    model = families.reference_model(family, variant)
    return model, families.uneven_batch(family, variant, model)


def randomise_adapters(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["dit", "wan", "hunyuan_video", "hunyuan_video_15"])
def test_fresh_adapters_change_nothing_and_merging_keeps_the_outputs(family: str) -> None:
    model, batch = model_and_batch(family)
    with torch.no_grad():
        base = model(batch)
        adapted = apply_lora(model, lora_config(family))
        assert torch.equal(model(batch), base)  # B = 0
        randomise_adapters(model)
        with_adapters = model(batch)
        assert (with_adapters - base).abs().max() > 1e-2 * base.abs().max()  # the adapters act
        assert merge_lora(model) == len(adapted)
        assert not adapter_state_dict(model)
        torch.testing.assert_close(
            model(batch), with_adapters, rtol=1e-5, atol=1e-5 * base.abs().max().item()
        )


@pytest.mark.parametrize("family", ["dit", "wan", "hunyuan_video"])
def test_only_adapters_and_listed_parameters_learn(family: str) -> None:
    model, batch = model_and_batch(family)
    adapted = apply_lora(model, lora_config(family))
    names = dict(model.named_parameters())
    assert all(f"{name}.lora_A.weight" in names and f"{name}.lora_B.weight" in names for name in adapted)
    trainable = {name for name, p in names.items() if p.requires_grad}
    listed = {name for name in names if name.startswith(TRAINABLE[family][0][:-1])}
    assert trainable == {name for name in names if is_adapter(name)} | listed and listed
    optimizer = torch.optim.AdamW([p for p in names.values() if p.requires_grad], lr=1e-3)
    model(batch).square().mean().backward()
    optimizer.step()
    for name, p in names.items():
        assert (p.grad is not None) == (name in trainable), name
        assert (p in optimizer.state) == (name in trainable), name
    # At B = 0, A's gradient is zero but B's is (A x)ᵀ·g: the first step moves B.
    assert any(is_adapter(n) and "lora_B" in n and p.abs().sum() > 0 for n, p in names.items())


def test_rank_zero_with_trainable_patterns_is_partial_fine_tuning() -> None:
    model, _ = model_and_batch("wan")
    assert apply_lora(model, lora_config("wan", rank=0, targets=[])) == []
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(name.startswith("condition_embedder.image_embedder.") for name in trainable)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"targets": ["blocks.*.attn9.to_q"]}, "'blocks.\\*.attn9.to_q' matches no module of the WanTransformer"),
     ({"targets": ["blocks.*.norm2"]}, "matches blocks.0.norm2, a LayerNorm, and no linear layer"),
     ({"trainable": ["nothing.*"]}, "model.lora.trainable: 'nothing.\\*' matches no parameter"),
     ({"rank": 0}, "adapters need both a rank > 0 and targets"),
     ({"init": "orthogonal"}, "model.lora.init='orthogonal' is not one of kaiming, gaussian")],
)  # fmt: skip
def test_bad_settings_are_named(changes: dict, message: str) -> None:
    model, _ = model_and_batch("wan")
    with pytest.raises(ValueError, match=message):
        apply_lora(model, lora_config("wan", **changes))

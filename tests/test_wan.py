"""Wan 2.1 as an imontage family: diffusers' weights load by name and give diffusers' outputs.

Each test builds a tiny random ``diffusers.WanTransformer3DModel``, saves it, loads the safetensors
file into :class:`WanTransformer` (strict, by name) and compares fp32 outputs on the same latents,
timesteps and text: one sample, and samples of different sizes packed together, each against its
own unpacked diffusers run. Every preset, at test size and counted at full size, is held to diffusers
in tests/test_family_conformance.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from safetensors.torch import load_file

from imontage.config import load_recipe
from imontage.config.schema import ModelConfig
from imontage.models import build_model, packing_spec
from imontage.models.common import (
    PackedBatch,
    PackingSpec,
    Sample,
    Segment,
    pack_samples,
    unpatchify_segments,
)
from imontage.models.common.attention import varlen_attention
from imontage.models.wan.model import WanTransformer, build_wan

RTOL = 1e-5

HEADS, HEAD_DIM = 2, 16
# diffusers' WanRotaryPosEmbed: h and w get 2·(D//6) dims each, t the rest; a pair is 2 dims.
BANDS = [0, (HEAD_DIM - 4 * (HEAD_DIM // 6)) // 2, HEAD_DIM // 6, HEAD_DIM // 6]
TEXT_DIM, IMAGE_DIM, IMAGE_TOKENS = 24, 20, 5
LATENT, CONDITION = 4, 3  # I2V: 4 noisy channels + 3 condition channels (Wan: 16 + 4 mask + 16)


def wan_reference() -> Any:
    """diffusers' ``WanTransformer3DModel`` (a dependency of imontage: never skipped)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


@dataclass
class Variant:
    name: str
    text_len: int  # 0: diffusers gets each sample's own text, unpadded
    i2v: bool = False


VARIANTS = [
    Variant("t2v", text_len=0),
    Variant("t2v_padded", text_len=12),
    # diffusers' I2V attention takes the last 512 context tokens as text: the pipeline's padding.
    Variant("i2v", text_len=512, i2v=True),
]


def diffusers_kwargs(variant: Variant) -> dict[str, Any]:
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "in_channels": LATENT + (CONDITION if variant.i2v else 0),
        "out_channels": LATENT,
        "text_dim": TEXT_DIM,
        "freq_dim": 16,
        "ffn_dim": 48,
        "num_layers": 2,
        "cross_attn_norm": True,
        "eps": 1e-6,
        "image_dim": IMAGE_DIM if variant.i2v else None,
        "added_kv_proj_dim": HEADS * HEAD_DIM if variant.i2v else None,
        "rope_max_seq_len": 64,
    }


def imontage_config(variant: Variant) -> Any:
    kw = diffusers_kwargs(variant)
    values = {
        "family": "wan",
        "in_channels": kw["in_channels"],
        "patch_size": list(kw["patch_size"]),
        "hidden_size": HEADS * HEAD_DIM,
        "depth": kw["num_layers"],
        "num_heads": HEADS,
        "mlp_hidden_size": kw["ffn_dim"],
        "text_encoder": "precomputed",
        "text_dim": TEXT_DIM,
        "max_text_len": 512,
        "rope": {"bands": BANDS, "pair_layout": "interleaved"},
        "positions": {"layout": "video3d"},
        "wan": {
            "out_channels": LATENT,
            "freq_dim": kw["freq_dim"],
            "eps": kw["eps"],
            "image_dim": IMAGE_DIM if variant.i2v else 0,
            "added_kv_proj_dim": kw["added_kv_proj_dim"] or 0,
            "text_len": variant.text_len,
            "rope_max_seq_len": kw["rope_max_seq_len"],
        },
    }
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), values)


def randomised(model: Any, seed: int) -> Any:
    """Every parameter random (the default init leaves LayerNorm weights at one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(variant, diffusers model, imontage model loaded from the diffusers folder by name)."""
    variant: Variant = request.param
    torch.manual_seed(0)
    reference = randomised(wan_reference()(**diffusers_kwargs(variant)), seed=1).eval()
    folder = tmp_path_factory.mktemp(variant.name)
    reference.save_pretrained(folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    model = build_wan(imontage_config(variant))
    model.load_state_dict(state, strict=True)
    return variant, reference, model.eval()


@dataclass
class Case:
    """One sample's inputs in diffusers' layout."""

    latents: torch.Tensor  # [C, T, H, W]
    condition: torch.Tensor | None  # [C', T, H, W]
    t: torch.Tensor  # [T'·H'·W'] per-token timestep in [0, 1]
    text: torch.Tensor  # [L, E]
    image: torch.Tensor | None  # [IMAGE_TOKENS, IMAGE_DIM]


def make_case(
    gen: torch.Generator, shape: tuple[int, int, int], text_len: int, i2v: bool, per_token: bool
) -> Case:
    frames, height, width = shape
    tokens = frames * (height // 2) * (width // 2)
    t = torch.rand(tokens, generator=gen) if per_token else torch.rand(1, generator=gen).expand(tokens)
    return Case(
        latents=torch.randn(LATENT, frames, height, width, generator=gen),
        condition=torch.randn(CONDITION, frames, height, width, generator=gen) if i2v else None,
        t=t.clone(),
        text=torch.randn(text_len, TEXT_DIM, generator=gen),
        image=torch.randn(IMAGE_TOKENS, IMAGE_DIM, generator=gen) if i2v else None,
    )


def reference_output(reference: Any, case: Case, text_len: int) -> torch.Tensor:
    """diffusers on one sample: ``[C, T, H, W]`` velocity, with the text zero-padded as the pipeline does."""
    x = case.latents if case.condition is None else torch.cat([case.latents, case.condition])
    text = case.text
    if text_len:
        text = torch.cat([text, text.new_zeros(text_len - text.shape[0], TEXT_DIM)])
    # Wan 2.1 takes one timestep per sample [B]; diffusers also takes one per token [B, seq].
    timestep = 1000.0 * (case.t[:1] if bool((case.t == case.t[0]).all()) else case.t[None])
    with torch.no_grad():
        out = reference(
            hidden_states=x[None],
            timestep=timestep,
            encoder_hidden_states=text[None],
            encoder_hidden_states_image=None if case.image is None else case.image[None],
            return_dict=False,
        )[0]
    return out[0]


def pack(cases: list[Case], model: WanTransformer) -> PackedBatch:
    spec = PackingSpec(in_channels=LATENT, patch_size=model.patch_size, max_text_len=512, layout="video3d")
    samples = [
        Sample(
            [
                Segment("text", data=case.text),
                Segment("video", role="target", data=case.latents, channel_condition=case.condition),
            ],
            image_embeds=case.image,
        )
        for case in cases
    ]
    batch = pack_samples(samples, spec)
    timesteps = torch.zeros(batch.is_text.shape[0])
    for span, case in zip((s for s in batch.spans if s.kind != "text"), cases, strict=True):
        timesteps[span.start : span.start + span.length] = case.t
    return batch.replace(timesteps=timesteps)


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    torch.testing.assert_close(out / scale, expected / scale, rtol=RTOL, atol=RTOL)


def test_single_sample_equals_diffusers(pair: tuple) -> None:
    variant, reference, model = pair
    gen = torch.Generator().manual_seed(2)
    case = make_case(gen, (3, 4, 6), text_len=7, i2v=variant.i2v, per_token=False)
    batch = pack([case], model)
    with torch.no_grad():
        out = model(batch)  # [N, C·pt·ph·pw]
    assert out.shape == (batch.is_text.shape[0], LATENT * math.prod(model.patch_size))
    assert not out[batch.is_text].any(), "text rows must output zeros"
    video = unpatchify_segments(out, batch, model.patch_size)[0][1]
    assert video is not None
    assert_matches(video, reference_output(reference, case, variant.text_len))


def test_packed_samples_each_equal_their_own_diffusers_run(pair: tuple) -> None:
    variant, reference, model = pair
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 4, 4), (3, 4, 6), (2, 6, 2)]
    cases = [
        make_case(gen, shape, text_len=n, i2v=variant.i2v, per_token=True)
        for shape, n in zip(shapes, (3, 9, 5), strict=True)
    ]
    batch = pack(cases, model)
    with torch.no_grad():
        out = model(batch)
    videos = unpatchify_segments(out, batch, model.patch_size)
    for index, case in enumerate(cases):
        video = videos[index][1]
        assert video is not None
        assert_matches(video, reference_output(reference, case, variant.text_len))


def test_wrong_weights_do_not_match(pair: tuple) -> None:
    """The comparison can fail: a perturbed cross-attention weight changes the output."""
    variant, reference, model = pair
    case = make_case(torch.Generator().manual_seed(4), (1, 4, 4), 5, variant.i2v, per_token=False)
    batch = pack([case], model)
    expected = reference_output(reference, case, variant.text_len)
    weight = model.blocks[0].attn2.to_k.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.1)
            out = model(batch)
            video = unpatchify_segments(out, batch, model.patch_size)[0][1]
        with pytest.raises(AssertionError):
            assert_matches(video, expected)  # type: ignore[arg-type]
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_tiny_preset_builds_and_runs() -> None:
    cfg = load_recipe(
        REPO / "configs/recipes/quickstart.yaml", ["model=wan_tiny", "model.prediction=velocity"]
    ).model
    model = build_model(cfg)
    assert isinstance(model, WanTransformer)
    gen = torch.Generator().manual_seed(5)
    sample = Sample(
        [
            Segment("text", data=torch.randn(5, cfg.text_dim, generator=gen)),
            Segment("video", role="target", data=torch.randn(cfg.in_channels, 2, 4, 4, generator=gen)),
        ]
    )
    batch = pack_samples([sample], packing_spec(cfg))
    batch = batch.replace(timesteps=torch.where(batch.is_text, 0.0, 0.5))
    out = model(batch)
    assert out.shape == (batch.is_text.shape[0], cfg.wan.out_channels * 4)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("pair", [VARIANTS[2]], indirect=True, ids=["i2v"])  # I2V runs every path
def test_gradient_checkpointing_gives_the_same_gradients(pair: tuple) -> None:
    variant, _, model = pair
    gen = torch.Generator().manual_seed(6)
    cases = [make_case(gen, shape, 4, variant.i2v, per_token=True) for shape in ((1, 4, 4), (2, 2, 4))]
    batch = pack(cases, model)
    grads = []
    model.train()
    try:
        for checkpointing in (False, True):
            model.zero_grad()
            model.gradient_checkpointing = checkpointing
            model(batch).square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    finally:
        model.gradient_checkpointing = False
        model.zero_grad()
        model.eval()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# Only a text_len above 0 and below the packing's 512 can be exceeded.
@pytest.mark.parametrize("pair", [VARIANTS[1]], indirect=True, ids=["t2v_padded"])
def test_more_text_than_text_len_is_an_error(pair: tuple) -> None:
    variant, _, model = pair
    case = make_case(torch.Generator().manual_seed(7), (1, 2, 2), variant.text_len + 1, variant.i2v, False)
    with pytest.raises(ValueError, match="text_len"):
        model(pack([case], model))


def test_cross_attention_with_its_own_key_packing_equals_masked_attention() -> None:
    """varlen_attention with cu_seqlens_k: sequence i of q attends to sequence i of k only."""
    gen = torch.Generator().manual_seed(8)
    q_lengths, k_lengths = [3, 0, 5, 2], [4, 2, 1, 0]  # an empty query and an empty key sequence
    q = torch.randn(sum(q_lengths), 2, 8, generator=gen)
    k = torch.randn(sum(k_lengths), 2, 8, generator=gen)
    v = torch.randn(sum(k_lengths), 2, 6, generator=gen)  # value width may differ from q/k's
    cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_attention(
        q, k, v, cu_q, max(q_lengths), "sdpa", cu_seqlens_k=cu_k, max_seqlen_k=max(k_lengths)
    )
    q_owner = torch.repeat_interleave(torch.arange(4), torch.tensor(q_lengths))
    k_owner = torch.repeat_interleave(torch.arange(4), torch.tensor(k_lengths))
    allowed = q_owner[:, None] == k_owner[None, :]  # [Nq, Nk]
    scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(8)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()  # no key: zeros
    expected = torch.einsum("hnm,mhd->nhd", weights, v)
    torch.testing.assert_close(out, expected)
    self_out = varlen_attention(q, q, q, cu_q, max(q_lengths), "sdpa")  # without: q's own packing
    cross_self = varlen_attention(q, q, q, cu_q, max(q_lengths), "sdpa", cu_seqlens_k=cu_q)
    torch.testing.assert_close(self_out, cross_self)


@pytest.mark.parametrize("pair", [VARIANTS[2]], indirect=True, ids=["i2v"])  # I2V runs every path
def test_bf16_runs_close_to_fp32(pair: tuple) -> None:
    variant, _, model = pair
    gen = torch.Generator().manual_seed(9)
    batch = pack([make_case(gen, (2, 4, 4), 5, True, per_token=True)], model)
    with torch.no_grad():
        expected = model(batch)
        out = copy.deepcopy(model).to(torch.bfloat16)(batch)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).norm() / expected.norm() < 0.05

"""The fused multi-axis RoPE kernels (kernels/rope) on CPU through Triton's interpreter.

An autouse fixture sets ``TRITON_INTERPRET=1`` for this module only: the dispatch reads the variable at
every call and the kernels are decorated per mode, so these tests run the Triton kernels whether the
file runs alone or inside the whole suite, while the model and training tests keep the PyTorch path.

Oracles: ``apply_rope`` in float64 (the reference the model falls back to); megatron-core's rotary
embedding for the 1D case; explicit per-token rotation matrices built from DESIGN.md's formulas for
the multi-axis case; ``F.rms_norm`` + ``apply_rope`` in float64 for the fused QK-norm variant.
Every tensor the kernels allocate is filled with NaN first (``fill_uninitialized_memory``), and the
launch tests pass NaN-filled outputs, so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from torch import nn

import imontage.kernels.rope.ops as rope_ops
from imontage.kernels.rope import multi_axis_rope, qk_norm_rope, rope_launch
from imontage.kernels.rope.reference import apply_rope
from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.common.rope import MultiAxisRope
from imontage.models.dit.model import DiT

THETA4 = (10000.0, 500.0, 10000.0, 2000.0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (atol, rtol) against float64: fp32 is limited by fp32 angles of positions up to 1000 (a few 1e-5
# rad), bf16 and fp16 by rounding the output once.
TOLERANCE = {torch.float32: (2e-4, 1e-4), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def poisoned_allocations() -> object:
    """``torch.empty`` returns NaN-filled memory while a test runs."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Case:
    head_dim: int
    bands: tuple[int, ...]
    tokens: int = 37
    q_heads: int = 5
    k_heads: int = 3

    @property
    def theta(self) -> tuple[float, ...]:
        return THETA4[: len(self.bands)]

    def __str__(self) -> str:
        return f"D{self.head_dim}-bands{'.'.join(map(str, self.bands))}-N{self.tokens}-H{self.q_heads}.{self.k_heads}"


CASES = [
    Case(64, (32,)),  # 1 axis, every pair rotated
    Case(64, (20,), tokens=1),  # 1 axis, 12 pairs copied; a single token
    Case(72, (12, 11, 10), tokens=29, q_heads=4, k_heads=4),  # D/2 = 36 is no power of two; 3 pairs copied
    Case(128, (22, 21, 21), tokens=41, q_heads=6, k_heads=2),  # Wan-like 3D
    Case(128, (8, 16, 20, 20), tokens=23, q_heads=3, k_heads=3),  # the 4D default
    Case(128, (0, 6, 5, 5), tokens=19, q_heads=24, k_heads=8),  # an empty axis, 48 pairs copied, 3 head steps
    Case(72, (10, 7), tokens=33, q_heads=20, k_heads=20),  # 2 axes, 5 head steps of 4
]


def random_inputs(
    case: Case, dtype: torch.dtype, seed: int, high: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.tokens, case.q_heads, case.head_dim, generator=g).to(dtype)  # [N, Hq, D]
    k = torch.randn(case.tokens, case.k_heads, case.head_dim, generator=g).to(dtype)  # [N, Hk, D]
    positions = torch.randint(0, high, (case.tokens, len(case.bands)), generator=g, dtype=torch.int32)
    return q, k, positions


def reference64(x: torch.Tensor, positions: torch.Tensor, case: Case, pair_layout: str) -> torch.Tensor:
    return apply_rope(x.double(), positions, case.bands, case.theta, pair_layout, torch.float64)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def test_allocations_are_poisoned() -> None:
    """The guard the other tests rely on: fresh memory reads as NaN, not as a plausible zero."""
    assert torch.isnan(torch.empty(64)).all()


# ----------------------------------------------------------------------------------------------------
# Rotation: forward and backward against float64


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_backward_match_float64_reference(
    case: Case, dtype: torch.dtype, pair_layout: str
) -> None:
    q, k, positions = random_inputs(case, dtype, seed=case.head_dim + len(case.bands) + case.tokens)
    interleaved = pair_layout == "interleaved"

    # The launch itself, into NaN-filled outputs.
    q_out, k_out = torch.full_like(q, math.nan), torch.full_like(k, math.nan)
    rope_launch(q, k, q_out, k_out, positions, case.bands, case.theta, interleaved)
    assert_close(q_out, reference64(q, positions, case, pair_layout), dtype)
    assert_close(k_out, reference64(k, positions, case, pair_layout), dtype)

    # Through autograd: the backward is a launch of its own (the inverse rotation).
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_rot, k_rot = multi_axis_rope(q, k, positions, case.bands, case.theta, pair_layout)
    assert torch.equal(q_rot, q_out) and torch.equal(k_rot, k_out)
    g = torch.Generator().manual_seed(7)
    grad_q, grad_k = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    torch.autograd.backward((q_rot, k_rot), (grad_q, grad_k))

    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    expected = (
        reference64(q64, positions, case, pair_layout),
        reference64(k64, positions, case, pair_layout),
    )
    torch.autograd.backward(expected, (grad_q.double(), grad_k.double()))
    assert q.grad is not None and k.grad is not None and q64.grad is not None and k64.grad is not None
    assert q.grad.dtype == dtype
    assert_close(q.grad, q64.grad, dtype)
    assert_close(k.grad, k64.grad, dtype)


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_packed_batch_of_many_short_sequences(pair_layout: str) -> None:
    """300 sequences of 1 to 5 tokens, each with its own video grid; positions restart per sequence."""
    g = torch.Generator().manual_seed(11)
    grids = []
    for _ in range(300):
        t, h, w = (int(v) for v in torch.randint(1, 4, (3,), generator=g))
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1
        )
        grids.append(grid.reshape(-1, 3)[: int(torch.randint(1, 6, (1,), generator=g))])
    positions = torch.cat(grids).to(torch.int32)  # [N, 3] (t, h, w)
    case = Case(128, (22, 21, 21), tokens=positions.shape[0], q_heads=4, k_heads=4)
    q = torch.randn(case.tokens, 4, 128, generator=g, dtype=torch.bfloat16)
    k = torch.randn(case.tokens, 4, 128, generator=g, dtype=torch.bfloat16)
    q_out, k_out = multi_axis_rope(q, k, positions, case.bands, case.theta, pair_layout)
    assert_close(q_out, reference64(q, positions, case, pair_layout), torch.bfloat16)
    assert_close(k_out, reference64(k, positions, case, pair_layout), torch.bfloat16)


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_batched_layout_matches_packed(pair_layout: str) -> None:
    """[B, S, H, D] with positions [B, S, A] rotates exactly like the same tokens packed as [B·S, H, D]."""
    case = Case(64, (4, 10, 9, 9), tokens=3 * 11)
    q, k, positions = random_inputs(case, torch.float16, seed=5)
    packed = multi_axis_rope(q, k, positions, case.bands, case.theta, pair_layout)
    batched = multi_axis_rope(
        q.view(3, 11, 5, 64),
        k.view(3, 11, 3, 64),
        positions.view(3, 11, 4),
        case.bands,
        case.theta,
        pair_layout,
    )
    assert batched[0].shape == (3, 11, 5, 64) and batched[1].shape == (3, 11, 3, 64)
    assert torch.equal(batched[0].reshape(q.shape), packed[0])
    assert torch.equal(batched[1].reshape(k.shape), packed[1])


def test_strided_q_and_k_from_a_fused_projection() -> None:
    """q and k as the model makes them: views into one qkv tensor, token stride 3·H·D."""
    case = Case(128, (8, 16, 20, 20), tokens=21, q_heads=4, k_heads=4)
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(case.tokens, 3, 4, 128, generator=g, dtype=torch.bfloat16)
    q, k, _ = qkv.unbind(1)  # [N, H, D] each, not contiguous
    positions = torch.randint(0, 500, (case.tokens, 4), generator=g, dtype=torch.int32)
    q_out, k_out = multi_axis_rope(q, k, positions, case.bands, case.theta)
    assert_close(q_out, reference64(q, positions, case, "half"), torch.bfloat16)
    assert_close(k_out, reference64(k, positions, case, "half"), torch.bfloat16)


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_in_place_matches_out_of_place_and_leaves_unbanded_pairs_alone(pair_layout: str) -> None:
    case = Case(72, (3, 5, 4, 4), tokens=27, q_heads=3, k_heads=2)  # 16 of 36 pairs rotate
    q0, k0, positions = random_inputs(case, torch.bfloat16, seed=8)
    expected_q, expected_k = multi_axis_rope(q0, k0, positions, case.bands, case.theta, pair_layout)
    q, k = q0.clone(), k0.clone()
    q_out, k_out = multi_axis_rope(q, k, positions, case.bands, case.theta, pair_layout, inplace=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)

    # Backward through the in-place path (on a non-leaf, as autograd requires).
    leaf = q0.float().requires_grad_(True)
    rotated, _ = multi_axis_rope(
        leaf * 1.0, k0.float(), positions, case.bands, case.theta, pair_layout, inplace=True
    )
    grad = torch.randn(rotated.shape, generator=torch.Generator().manual_seed(9))
    rotated.backward(grad)
    q64 = q0.double().requires_grad_(True)
    reference64(q64, positions, case, pair_layout).backward(grad.double())
    assert leaf.grad is not None and q64.grad is not None
    assert_close(leaf.grad, q64.grad, torch.float32)


def test_in_place_does_not_touch_pairs_beyond_the_bands() -> None:
    """In place, the unbanded pairs are neither read nor written: NaNs placed there stay NaN."""
    case = Case(64, (0, 4, 3, 3), tokens=9)  # pairs 10..31 unbanded
    q, k, positions = random_inputs(case, torch.float32, seed=10)
    q[..., 10:32] = math.nan  # half layout: the first elements of pairs 10..31
    rope_launch(q, k, q, k, positions, case.bands, case.theta, False)
    assert torch.isnan(q[..., 10:32]).all()
    assert not torch.isnan(q[..., :10]).any() and not torch.isnan(q[..., 32:42]).any()


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_unbanded_pairs_are_copied_exactly_even_when_not_finite(pair_layout: str) -> None:
    """Turning by angle 0 is not a copy: inf · cos 0 − inf · sin 0 is nan. The reference copies."""
    case = Case(64, (3, 4, 4, 4), tokens=7, q_heads=2, k_heads=2)  # pairs 15..31 unbanded
    q, k, positions = random_inputs(case, torch.float32, seed=14)
    unbanded = [*range(15, 32), *range(47, 64)] if pair_layout == "half" else list(range(30, 64))
    q[..., unbanded] = math.inf
    k[..., unbanded] = -math.inf
    q_out, k_out = multi_axis_rope(q, k, positions, case.bands, case.theta, pair_layout)
    assert torch.equal(q_out[..., unbanded], q[..., unbanded])
    assert torch.equal(k_out[..., unbanded], k[..., unbanded])
    assert_close(q_out, reference64(q, positions, case, pair_layout), torch.float32)


# ----------------------------------------------------------------------------------------------------
# Second oracles: megatron-core (1D) and explicit rotation matrices (multi-axis)


@pytest.mark.parametrize(
    ("pair_layout", "rotary_percent"), [("half", 1.0), ("interleaved", 1.0), ("interleaved", 0.5)]
)
def test_1d_matches_megatron_core(
    pair_layout: str, rotary_percent: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """megatron-core rotates pair i by p · base^(−2i/rot_dim): one axis of rot_dim/2 pairs here.

    Its half layout is ours; its interleaved layout with ``rotary_percent`` < 1 rotates the first
    rot_dim features and passes the rest, which is our interleaved partial rotation.
    """
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    head_dim, base, tokens = 64, 10000.0, 45
    interleaved = pair_layout == "interleaved"
    rotary = RotaryEmbedding(
        kv_channels=head_dim,
        rotary_percent=rotary_percent,
        rotary_interleaved=interleaved,
        rotary_base=int(base),
        use_cpu_initialization=True,
    )
    g = torch.Generator().manual_seed(12)
    positions = torch.randint(0, 1000, (tokens, 1), generator=g, dtype=torch.int32)
    q = torch.randn(tokens, 4, head_dim, generator=g)
    k = torch.randn(tokens, 2, head_dim, generator=g)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # get_emb moves its table to the GPU
    freqs = rotary.get_emb(1000)[positions[:, 0].long()]  # [N, 1, 1, rot_dim]: its own angle table

    def megatron(x: torch.Tensor) -> torch.Tensor:
        return _apply_rotary_pos_emb_bshd(x[:, None], freqs, rotary_interleaved=interleaved)[:, 0]

    bands = (int(head_dim * rotary_percent) // 2,)
    q_out, k_out = multi_axis_rope(q, k, positions, bands, (base,), pair_layout)
    torch.testing.assert_close(q_out, megatron(q), atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(k_out, megatron(k), atol=3e-4, rtol=1e-4)


def rotation_matrices(
    positions: torch.Tensor, bands: tuple[int, ...], theta: tuple[float, ...], head_dim: int, pair_layout: str
) -> torch.Tensor:
    """``[N, D, D]`` float64: per token, the block rotation DESIGN.md describes, built pair by pair.

    Pair j of axis a (axes in order, bands consecutive) turns by p_a · θ_a^(−j/n_a); the pair is
    (i, i + D/2) in the half layout and (2i, 2i+1) interleaved, i counting pairs over all axes.
    """
    n = positions.shape[0]
    rotation = torch.eye(head_dim, dtype=torch.float64).repeat(n, 1, 1)
    i = 0
    for axis, count in enumerate(bands):
        for j in range(count):
            angle = positions[:, axis].double() * theta[axis] ** (-j / count)  # [N]
            a, b = (i, i + head_dim // 2) if pair_layout == "half" else (2 * i, 2 * i + 1)
            rotation[:, a, a], rotation[:, a, b] = angle.cos(), -angle.sin()
            rotation[:, b, a], rotation[:, b, b] = angle.sin(), angle.cos()
            i += 1
    return rotation


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_3d_matches_rotation_matrices_from_the_design(pair_layout: str) -> None:
    """A Wan-like 3D clip (t, h, w) = 3×4×5 plus random far positions; forward and backward."""
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij"), -1)
    g = torch.Generator().manual_seed(13)
    far = torch.randint(0, 1000, (7, 3), generator=g)
    positions = torch.cat([grid.reshape(-1, 3), far]).to(torch.int32)  # [67, 3]
    bands, theta = (22, 21, 21), (10000.0, 10000.0, 10000.0)
    q = torch.randn(positions.shape[0], 3, 128, generator=g, requires_grad=True)
    k = torch.randn(positions.shape[0], 2, 128, generator=g, requires_grad=True)
    rotation = rotation_matrices(positions, bands, theta, 128, pair_layout)  # [N, D, D]

    q_out, k_out = multi_axis_rope(q, k, positions, bands, theta, pair_layout)
    torch.testing.assert_close(
        q_out.double(), torch.einsum("nde,nhe->nhd", rotation, q.double()), atol=2e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        k_out.double(), torch.einsum("nde,nhe->nhd", rotation, k.double()), atol=2e-4, rtol=1e-4
    )

    grad_q, grad_k = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    assert q.grad is not None and k.grad is not None
    # y = R x, so dL/dx = Rᵀ dL/dy
    expected_q = torch.einsum("ned,nhe->nhd", rotation, grad_q.double())
    torch.testing.assert_close(q.grad.double(), expected_q, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(
        k.grad.double(), torch.einsum("ned,nhe->nhd", rotation, grad_k.double()), atol=2e-4, rtol=1e-4
    )


# ----------------------------------------------------------------------------------------------------
# Fused QK-RMSNorm + rotation


FUSED_CASES = [
    Case(128, (8, 16, 20, 20), tokens=37, q_heads=5, k_heads=3),
    Case(72, (12, 11, 10), tokens=21, q_heads=4, k_heads=4),  # 3 pairs normalised but not rotated
    Case(64, (0, 6, 5, 5), tokens=50, q_heads=6, k_heads=2),  # 3 token blocks over 2 programs
]


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_qk_norm_rope_matches_unfused_pytorch(case: Case, dtype: torch.dtype, pair_layout: str) -> None:
    q, k, positions = random_inputs(case, dtype, seed=20 + case.tokens)
    g = torch.Generator().manual_seed(21)
    q = (q.float() * 3.0).to(dtype).requires_grad_(True)  # not unit RMS, so the norm matters
    k = k.requires_grad_(True)
    q_weight = (1 + 0.5 * torch.randn(case.head_dim, generator=g)).requires_grad_(True)
    k_weight = (1 + 0.5 * torch.randn(case.head_dim, generator=g)).requires_grad_(True)
    eps = 1e-6

    q_out, k_out = qk_norm_rope(q, k, q_weight, k_weight, positions, case.bands, case.theta, pair_layout, eps)
    grad_q, grad_k = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, q_weight, k_weight)]
    q64, k64, qw64, kw64 = leaves64
    expected = (
        reference64(F.rms_norm(q64, (case.head_dim,), qw64, eps), positions, case, pair_layout),
        reference64(F.rms_norm(k64, (case.head_dim,), kw64, eps), positions, case, pair_layout),
    )
    torch.autograd.backward(expected, (grad_q.double(), grad_k.double()))

    assert_close(q_out, expected[0], dtype, scale=2.0)
    assert_close(k_out, expected[1], dtype, scale=2.0)
    for leaf, leaf64 in zip((q, k), (q64, k64), strict=True):
        assert leaf.grad is not None and leaf64.grad is not None
        assert_close(leaf.grad, leaf64.grad, dtype, scale=2.0)
    # Weight gradients sum N·H terms: compare relative to their size.
    for weight, weight64 in zip((q_weight, k_weight), (qw64, kw64), strict=True):
        assert weight.grad is not None and weight64.grad is not None
        size = weight64.grad.abs().max().item()
        assert_close(weight.grad, weight64.grad, dtype, scale=2.0 * max(1.0, size))


def test_model_attention_uses_the_fused_kernel_and_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny DiT on the kernel path (interpreter) agrees with its PyTorch path, outputs and grads."""
    cfg = tiny_model_config(depth=1)
    g = torch.Generator().manual_seed(30)
    sample = Sample(
        [Segment("text", text="a cat"), Segment("image", "target", torch.randn(3, 1, 16, 12, generator=g))]
    )
    batch = pack_samples([sample], packing_spec(cfg))
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(batch)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    launches: list[bool] = []  # one entry per launch: whether it fused the norm
    launch = rope_ops.rope_launch

    def counted_launch(*args: Any, **kwargs: Any) -> None:
        launches.append(kwargs.get("norm_weights") is not None)
        launch(*args, **kwargs)

    monkeypatch.setattr(rope_ops, "rope_launch", counted_launch)
    kernel_out, kernel_grads = run()
    assert launches and all(launches), "the model's attention did not reach the fused kernel"
    monkeypatch.delenv("TRITON_INTERPRET")
    launches.clear()
    reference_out, reference_grads = run()
    assert not launches, "without TRITON_INTERPRET, CPU tensors must take the PyTorch reference"
    torch.testing.assert_close(kernel_out, reference_out, atol=1e-4, rtol=1e-4)
    for a, b in zip(kernel_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Dispatch, torch.library and torch.compile


def test_cpu_without_interpreter_takes_the_reference_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")

    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("kernel launched for a CPU tensor without TRITON_INTERPRET")

    monkeypatch.setattr(rope_ops, "rope_launch", no_launch)
    case = CASES[4]
    q, k, positions = random_inputs(case, torch.float32, seed=31)
    q_out, _ = multi_axis_rope(q, k, positions, case.bands, case.theta)
    assert torch.equal(q_out, apply_rope(q, positions, case.bands, case.theta))
    w = torch.rand(case.head_dim) + 0.5
    q_out, _ = qk_norm_rope(q, k, w, w, positions, case.bands, case.theta, eps=1e-6)
    assert torch.equal(
        q_out,
        apply_rope(nn.functional.rms_norm(q, (case.head_dim,), w, 1e-6), positions, case.bands, case.theta),
    )


def test_custom_ops_pass_opcheck() -> None:
    """Schemas, fake implementations, autograd registration and AOT dispatch of the torch.library ops."""
    case = Case(64, (4, 10, 9, 9), tokens=9, q_heads=2, k_heads=1)
    q, k, positions = random_inputs(case, torch.float32, seed=32)
    w = torch.rand(64) + 0.5
    bands, theta = list(case.bands), list(case.theta)
    torch.library.opcheck(
        torch.ops.imontage.rope.default,
        (q.requires_grad_(True), k.requires_grad_(True), positions, bands, theta, True, False),
    )
    torch.library.opcheck(
        torch.ops.imontage.rope_.default,
        (q.detach().clone(), k.detach().clone(), positions, bands, theta, False),
    )
    torch.library.opcheck(
        torch.ops.imontage.qk_norm_rope.default,
        (
            q,
            k,
            w.clone().requires_grad_(True),
            w.clone().requires_grad_(True),
            positions,
            bands,
            theta,
            False,
            1e-6,
        ),
    )


class QKNormRopeAttentionScores(nn.Module):
    """Enough of an attention block to trace: projection, fused QK-norm + RoPE, scores."""

    def __init__(self, heads: int = 2, head_dim: int = 32) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qk = nn.Linear(heads * head_dim, 2 * heads * head_dim)
        self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.rope = MultiAxisRope((2, 5, 5, 4), THETA4, "interleaved")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).view(x.shape[0], 2, self.heads, self.head_dim).unbind(1)
        q, k = self.rope.normed(q, k, positions, self.q_norm, self.k_norm)
        q2, k2 = self.rope(q, k, positions)  # the plain rotation too
        return (q2 * k2).sum(-1)  # [N, H]


def test_torch_compile_traces_the_ops_without_graph_breaks() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(33)
    module = QKNormRopeAttentionScores()
    x = torch.randn(13, 64, generator=g)
    positions = torch.randint(0, 100, (13, 4), generator=g, dtype=torch.int32)
    eager = module(x, positions)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    out = compiled(x, positions)
    out.sum().backward()
    assert counter.frame_count == 1  # one graph: fullgraph=True already rejects breaks
    targets = {str(node.target) for node in counter.graphs[0].graph.nodes if node.op == "call_function"}
    assert {"imontage.qk_norm_rope.default", "imontage.rope.default"} <= targets, targets
    torch.testing.assert_close(out, eager)
    for p, expected in zip((p for p in module.parameters() if p.grad is not None), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, expected)


# ----------------------------------------------------------------------------------------------------
# Errors


def _bad_calls() -> list[tuple[str, object, type[Exception], str]]:
    q, k = torch.zeros(4, 2, 16), torch.zeros(4, 1, 16)
    pos = torch.zeros(4, 4, dtype=torch.int32)
    w = torch.ones(16)
    b, t = (2, 2, 2, 2), THETA4
    return [
        (
            "bands beyond D/2",
            lambda: multi_axis_rope(q, k, pos, (2, 2, 2, 3), t),
            ValueError,
            "cannot hold 9",
        ),
        (
            "odd head dim",
            lambda: multi_axis_rope(q[..., :15], k[..., :15], pos, (1, 1, 1, 1), t),
            ValueError,
            "cannot hold",
        ),
        ("five axes", lambda: multi_axis_rope(q, k, pos, (1,) * 5, (1e4,) * 5), ValueError, "1 to 4 axes"),
        ("theta per axis", lambda: multi_axis_rope(q, k, pos, b, t[:3]), ValueError, "one base per axis"),
        ("positions axes", lambda: multi_axis_rope(q, k, pos[:, :3], b, t), ValueError, r"expected \[4, 4\]"),
        ("positions tokens", lambda: multi_axis_rope(q, k, pos[:3], b, t), ValueError, "do not fit"),
        ("float positions", lambda: multi_axis_rope(q, k, pos.float(), b, t), TypeError, "int32"),
        ("2D q", lambda: multi_axis_rope(q[0], k[0], pos, b, t), ValueError, r"\[N, H, D\]"),
        ("tokens differ", lambda: multi_axis_rope(q, k[:3], pos, b, t), ValueError, "same tokens"),
        (
            "float64 kernel",
            lambda: multi_axis_rope(q.double(), k.double(), pos, b, t),
            TypeError,
            "float32, bfloat16",
        ),
        ("layout", lambda: multi_axis_rope(q, k, pos, b, t, "split"), ValueError, "unknown RoPE pair layout"),
        (
            "norm weight",
            lambda: qk_norm_rope(q, k, w[:8], w, pos, b, t),
            ValueError,
            r"q_weight must be \[D\]",
        ),
    ]


@pytest.mark.parametrize(("name", "call", "error", "match"), _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_are_clear_errors(name: str, call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------------
# The compiled (GPU) path: the interpreter accepts code the compiler rejects, so compile it for sm_90.


def _cannot_compile_here() -> str:
    """Why the sm_90 compile cannot run in this process ('' when it can)."""
    import triton
    import triton.language as tl

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")):
        return "triton's NVIDIA backend (ptxas) is not installed"
    if not isinstance(tl.standard._sum_combine, triton.runtime.JITFunction):
        return (
            "triton was imported under TRITON_INTERPRET=1: its own library is decorated for the interpreter"
        )
    return ""


@pytest.mark.skipif(bool(_cannot_compile_here()), reason=_cannot_compile_here())
def test_kernels_compile_for_sm90() -> None:
    """The kernels lower to sm_90 machine code (no GPU needed), with 16-byte vector loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = rope_ops.kernel_module(interpret=False)
    aligned = [["tt.divisibility", 16]]

    def compile_for_sm90(fn: object, dtype: str, constants: dict[str, object]) -> str:
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):  # type: ignore[attr-defined]
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                partial = name.startswith("grad_") and name.endswith("weight_ptr")
                signature[name] = "*i32" if name == "pos_ptr" else "*fp32" if partial else f"*{dtype}"
                attrs[(i,)] = aligned
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
                if name.startswith("stride") and name != "stride_pos_n":
                    attrs[(i,)] = aligned
        compiled = triton.compile(
            ASTSource(fn, signature, constants, attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 8},
        )
        return compiled.asm["ptx"]

    for interleaved in (False, True):
        config = rope_ops._launch_config(40, 40, 128, interpret=False)
        config.pop("num_warps")
        for norm in (False, True):
            ptx = compile_for_sm90(
                kernels.rope_kernel, "bf16",
                dict(HEAD_DIM=128, BANDS=(0, 22, 21, 21), THETA=(1e4,) * 4, PAIRS=64, INTERLEAVED=interleaved,
                     INVERSE=not norm, NORM=norm, **config),
            )  # fmt: skip
            assert ".v4." in ptx, "expected 16-byte vector loads of the bf16 rows"
        config = rope_ops._launch_config(40, 40, 128, interpret=False, tile_pairs=1024)
        config.pop("num_warps")
        compile_for_sm90(
            kernels.qk_norm_rope_backward_kernel, "bf16",
            dict(HEAD_DIM=128, BANDS=(8, 16, 20, 20), THETA=THETA4, INTERLEAVED=interleaved, **config),
        )  # fmt: skip
    config = rope_ops._launch_config(5, 3, 72, interpret=False)
    config.pop("num_warps")
    compile_for_sm90(
        kernels.rope_kernel, "fp16",
        dict(HEAD_DIM=72, BANDS=(3, 11, 11), THETA=(1e4,) * 3, PAIRS=25, INTERLEAVED=True, INVERSE=False,
             NORM=False, **config),
    )  # fmt: skip

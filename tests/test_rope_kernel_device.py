"""The RoPE kernels compiled for a GPU (not the interpreter): forward and backward, fp32 and bf16, on CUDA.

tests/test_rope_kernel.py checks the kernels through Triton's interpreter, which accepts code the compiler
rejects and runs programs one at a time; here the same cases (its shapes, inputs, float64 oracles and
tolerances) run compiled on the GPU, plus a long sequence whose token offsets pass 2^31 elements and whose
fused backward walks many token blocks per program. It needs CUDA: ``tools/device_check.sh`` runs it on a
lent GPU. ``IMONTAGE_KERNEL_DEVICE=cpu`` runs its first cases on the CPU through the interpreter instead,
which is how the check's ``--cpu`` mode keeps this file from rotting; otherwise, without CUDA, it skips
(the interpreter runs every case in tests/test_rope_kernel.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_rope_kernel import CASES, FUSED_CASES, Case, assert_close, random_inputs, reference64

from imontage.kernels.rope import multi_axis_rope, qk_norm_rope

ON_CPU = os.environ.get("IMONTAGE_KERNEL_DEVICE") == "cpu"
DEVICE = torch.device("cpu" if ON_CPU or not torch.cuda.is_available() else "cuda")
if DEVICE.type == "cpu" and not ON_CPU:
    pytest.skip(
        "needs CUDA (IMONTAGE_KERNEL_DEVICE=cpu runs it through the interpreter)", allow_module_level=True
    )

DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("half", "interleaved")
# Interpreted on a CPU, one case of each kind is enough to keep the file working.
ROPE_CASES = CASES[:1] if ON_CPU else CASES
NORM_CASES = FUSED_CASES[:1] if ON_CPU else FUSED_CASES
# Wan-14B's heads over 2^31 / (40 · 128) + 1 tokens: int32 token offsets would wrap.
LONG = Case(128, (0, 22, 21, 21), tokens=2**31 // (40 * 128) + 1, q_heads=40, k_heads=40)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies on the device under test (copies on the CPU too: the CPU originals feed the oracle)."""
    return [t.detach().to(DEVICE, copy=True) for t in tensors]


@pytest.mark.parametrize("pair_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_rope_forward_and_backward_on_device(case: Case, dtype: torch.dtype, pair_layout: str) -> None:
    q, k, positions = random_inputs(case, dtype, seed=case.head_dim + len(case.bands) + case.tokens)
    g = torch.Generator().manual_seed(7)
    grad_q, grad_k = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    dq, dk, dpos, dgrad_q, dgrad_k = on_device(q, k, positions, grad_q, grad_k)
    dq.requires_grad_(True)
    dk.requires_grad_(True)
    q_out, k_out = multi_axis_rope(dq, dk, dpos, case.bands, case.theta, pair_layout)
    torch.autograd.backward((q_out, k_out), (dgrad_q, dgrad_k))

    q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
    expected = reference64(q64, positions, case, pair_layout), reference64(k64, positions, case, pair_layout)
    torch.autograd.backward(expected, (grad_q.double(), grad_k.double()))
    assert dq.grad is not None and dk.grad is not None and q64.grad is not None and k64.grad is not None
    assert q_out.device.type == DEVICE.type and dq.grad.dtype == dtype
    for actual, wanted in (
        (q_out, expected[0]),
        (k_out, expected[1]),
        (dq.grad, q64.grad),
        (dk.grad, k64.grad),
    ):
        assert_close(actual.cpu(), wanted.detach(), dtype)


@pytest.mark.parametrize("pair_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_qk_norm_rope_forward_and_backward_on_device(
    case: Case, dtype: torch.dtype, pair_layout: str
) -> None:
    q, k, positions = random_inputs(case, dtype, seed=20 + case.tokens)
    g = torch.Generator().manual_seed(21)
    q = (q.float() * 3.0).to(dtype)  # not unit RMS, so the norm matters
    q_weight, k_weight = (
        1 + 0.5 * torch.randn(case.head_dim, generator=g),
        1 + 0.5 * torch.randn(case.head_dim, generator=g),
    )
    grad_q, grad_k = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    leaves = [t.requires_grad_(True) for t in on_device(q, k, q_weight, k_weight)]
    dpos, dgrad_q, dgrad_k = on_device(positions, grad_q, grad_k)
    outputs = qk_norm_rope(*leaves, dpos, case.bands, case.theta, pair_layout, 1e-6)
    torch.autograd.backward(outputs, (dgrad_q, dgrad_k))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, q_weight, k_weight)]
    q64, k64, qw64, kw64 = leaves64
    expected = (
        reference64(F.rms_norm(q64, (case.head_dim,), qw64, 1e-6), positions, case, pair_layout),
        reference64(F.rms_norm(k64, (case.head_dim,), kw64, 1e-6), positions, case, pair_layout),
    )
    torch.autograd.backward(expected, (grad_q.double(), grad_k.double()))
    for actual, wanted in zip(outputs, expected, strict=True):
        assert_close(actual.cpu(), wanted.detach(), dtype, scale=2.0)
    for leaf, leaf64 in zip(leaves, leaves64, strict=True):
        assert leaf.grad is not None and leaf64.grad is not None
        size = max(1.0, leaf64.grad.abs().max().item()) if leaf.dim() == 1 else 1.0  # weights sum N·H terms
        assert_close(leaf.grad.cpu(), leaf64.grad, dtype, scale=2.0 * size)


@pytest.mark.skipif(DEVICE.type == "cpu", reason="2^31 elements: a GPU-sized case")
def test_long_sequence_past_int32_offsets() -> None:
    """bf16 q, k [N, 40, 128] with N · 40 · 128 > 2^31: the last tokens, forward and fused backward."""
    case = LONG
    g = torch.Generator(device=DEVICE).manual_seed(3)
    shape = (case.tokens, case.q_heads, case.head_dim)
    q = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.randint(0, 1000, (case.tokens, 4), generator=g, device=DEVICE, dtype=torch.int32)
    q_out, k_out = multi_axis_rope(q, k, positions, case.bands, case.theta, "interleaved")
    tail = slice(case.tokens - 64, case.tokens)  # rows past element 2^31
    assert_close(
        q_out[tail].cpu(),
        reference64(q[tail].cpu(), positions[tail].cpu(), case, "interleaved"),
        torch.bfloat16,
    )
    assert_close(
        k_out[tail].cpu(),
        reference64(k[tail].cpu(), positions[tail].cpu(), case, "interleaved"),
        torch.bfloat16,
    )
    del q_out, k_out

    weight = torch.ones(case.head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    leaf = q.requires_grad_(True)
    out, _ = qk_norm_rope(leaf, k, weight, weight.detach(), positions, case.bands, case.theta, "interleaved")
    out.backward(torch.ones_like(out))
    assert leaf.grad is not None and weight.grad is not None
    q64 = q[tail].detach().cpu().double().requires_grad_(True)
    expected = reference64(
        F.rms_norm(q64, (case.head_dim,), None, 1e-6), positions[tail].cpu(), case, "interleaved"
    )
    expected.backward(torch.ones_like(expected))
    assert q64.grad is not None
    assert_close(leaf.grad[tail].cpu(), q64.grad, torch.bfloat16, scale=2.0)
    assert torch.isfinite(weight.grad.float()).all()

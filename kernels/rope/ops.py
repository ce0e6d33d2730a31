"""Host side of the multi-axis RoPE kernels: checks, launches, torch.library ops, autograd and dispatch.

Layers, bottom up:

- ``rope_launch`` (rotation, its inverse, or QK-RMSNorm + rotation) and ``qk_norm_rope_backward_launch``
  launch the Triton kernels of ``kernel.py`` on ``[N, H, D]`` tensors.
- torch.library custom ops wrap them so that ``torch.compile`` traces a model through them as single
  graph nodes (each has a fake implementation for shape propagation):
  ``imontage::rope`` (out of place; its backward is ``imontage::rope`` with ``inverse=True``, a launch of
  its own), ``imontage::rope_`` (in place), ``imontage::qk_norm_rope`` (per-head RMSNorm then rotation)
  and ``imontage::qk_norm_rope_backward``. The functional ops carry their backward formulas through
  ``register_autograd``; the in-place one, which cannot, goes through :class:`RopeInplaceFunction`.
- :func:`multi_axis_rope` and :func:`qk_norm_rope` are the entry points the model calls. They validate
  once, accept packed ``[N, H, D]`` or ``[B, S, H, D]`` activations, and dispatch: CUDA tensors run the
  kernel; CPU tensors run the PyTorch reference (``reference.py``) unless
  ``TRITON_INTERPRET=1``, in which case the kernel runs through Triton's interpreter (how CI tests it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import apply_rope

PAIR_LAYOUTS = ("half", "interleaved")
MAX_AXES = 4
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------
# Dispatch


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (read at every call, as Triton's own knob parses it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def kernel_enabled(x: Tensor) -> bool:
    """CUDA tensors use the Triton kernel; CPU tensors only under ``TRITON_INTERPRET=1`` (slow: tests)."""
    return x.device.type == "cuda" or interpreter_enabled()


@functools.cache
def kernel_module(interpret: bool) -> ModuleType:
    """``kernel.py`` with its functions decorated for one execution mode.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function (at import), not when it
    launches it. The model imports this package long before a test may set the variable, so each mode
    gets its own copy of the module, executed with Triton's interpret knob pinned to that mode.
    """
    import triton

    path = os.path.join(os.path.dirname(__file__), "kernel.py")
    name = f"{__package__}._kernel_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------
# Checks


def check_rope_args(
    bands: Sequence[int], theta: Sequence[float], pair_layout: str, head_dim: int
) -> tuple[tuple[int, ...], tuple[float, ...], bool]:
    """Validated ``(bands, theta, interleaved)``; the errors name what is wrong."""
    bands = tuple(int(b) for b in bands)
    theta = tuple(float(t) for t in theta)
    if not 1 <= len(bands) <= MAX_AXES:
        raise ValueError(f"RoPE bands: 1 to {MAX_AXES} axes, got {len(bands)} ({bands})")
    if len(theta) != len(bands):
        raise ValueError(f"RoPE theta: one base per axis, got {len(theta)} bases for {len(bands)} axes")
    if min(bands) < 0:
        raise ValueError(f"RoPE bands: pairs per axis must be >= 0, got {bands}")
    if any(not (t > 0.0 and math.isfinite(t)) for t in theta):
        raise ValueError(f"RoPE theta: bases must be positive and finite, got {theta}")
    if pair_layout not in PAIR_LAYOUTS:
        raise ValueError(f"unknown RoPE pair layout '{pair_layout}' (layouts: {', '.join(PAIR_LAYOUTS)})")
    if head_dim % 2 or sum(bands) > head_dim // 2:
        raise ValueError(f"head dim {head_dim} cannot hold {sum(bands)} rotary pairs (bands {bands})")
    return bands, theta, pair_layout == "interleaved"


def _check_activations(q: Tensor, k: Tensor, positions: Tensor, n_axes: int) -> None:
    """q ``[N, Hq, D]`` or ``[B, S, Hq, D]``, k alike with its own heads, positions ``[..., A]``."""
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        raise ValueError(
            f"RoPE takes q and k as [N, H, D] (packed) or [B, S, H, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same tokens and head dim")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise TypeError(f"RoPE rotates floating-point q and k, got {q.dtype} and {k.dtype}")
    if q.device != k.device or positions.device != q.device:
        raise ValueError(
            f"q, k and positions must share a device, got {q.device}, {k.device}, {positions.device}"
        )
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"RoPE positions must be int32 (or int64), got {positions.dtype}")
    tokens = q.shape[:-2]
    if positions.shape not in (torch.Size([math.prod(tokens), n_axes]), torch.Size([*tokens, n_axes])):
        raise ValueError(
            f"positions {tuple(positions.shape)} do not fit q {tuple(q.shape)} and {n_axes} axes: expected "
            f"[{math.prod(tokens)}, {n_axes}] (one row per token, one column per band)"
        )


def _check_kernel_inputs(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"the Triton RoPE kernel takes float32, bfloat16 or float16 tensors, got {t.dtype}"
            )


def _check_norm_weights(q_weight: Tensor, k_weight: Tensor, head_dim: int, device: torch.device) -> None:
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,):
            raise ValueError(f"{name} must be [D] = [{head_dim}], got {tuple(w.shape)}")
        if not w.is_floating_point() or w.device != device:
            raise ValueError(
                f"{name} must be a floating-point tensor on {device}, got {w.dtype} on {w.device}"
            )


# ----------------------------------------------------------------------------------------------------
# Launches


def _launch_config(
    q_heads: int, k_heads: int, head_dim: int, interpret: bool, tile_pairs: int = 2048
) -> dict[str, int]:
    """Tile sizes: BLOCK_P covers D/2; BLOCK_H heads per step, a power of two dividing the head counts
    when one >= 4 exists (no masked tail step); BLOCK_N tokens so that a tile holds about ``tile_pairs``
    pairs on a GPU. The interpreter runs programs one after another, so it gets fewer, larger ones.

    Chosen from sm_90 compiles (registers, vector width), not yet from GPU timings: with 8 warps the
    forward (2048 pairs) needs about 60 registers and loads 16 bytes per thread; the fused backward
    (1024 pairs) about 128.
    """
    block_p = 1 << (head_dim // 2 - 1).bit_length()
    common = math.gcd(q_heads, k_heads)
    block_h = min(common & -common, 16)  # largest power of two dividing both head counts
    if block_h < 4:
        block_h = min(1 << (max(q_heads, k_heads) - 1).bit_length(), 16)
    block_n = 16 if interpret else max(1, tile_pairs // (block_p * block_h))
    return {"BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_P": block_p, "num_warps": 8}


def _device_guard(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rope_launch(
    q: Tensor,
    k: Tensor,
    q_out: Tensor,
    k_out: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    interleaved: bool,
    *,
    inverse: bool = False,
    norm_weights: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-6,
) -> None:
    """Rotate q ``[N, Hq, D]`` and k ``[N, Hk, D]`` by positions ``[N, A]`` into q_out and k_out.

    ``inverse`` turns by the opposite angles (the backward). With ``norm_weights`` ``([D], [D])``, each
    head of q and k is RMS-normalised (``eps``) and scaled by its weight first, in the same launch.
    ``q_out is q`` and ``k_out is k`` (without norm) rotate in place: only the banded pairs are then
    read and written. The last dim of every tensor must be contiguous; token and head strides are free.
    """
    n_tokens, q_heads, head_dim = q.shape
    in_place = q_out is q and k_out is k and norm_weights is None
    pairs = sum(bands) if in_place else head_dim // 2  # in place, unbanded pairs already hold their output
    if n_tokens == 0 or pairs == 0:
        return
    q_weight, k_weight = norm_weights if norm_weights is not None else (q, k)  # unread without norm
    interpret = interpreter_enabled()
    config = _launch_config(q_heads, k.shape[1], head_dim, interpret)
    grid = (_cdiv(n_tokens, config["BLOCK_N"]),)
    with _device_guard(q):
        kernel_module(interpret).rope_kernel[grid](
            q, k, q_out, k_out, q_weight, k_weight, positions,
            n_tokens, q_heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), positions.stride(0),
            eps,
            HEAD_DIM=head_dim, BANDS=tuple(bands), THETA=tuple(theta), PAIRS=pairs,
            INTERLEAVED=interleaved, INVERSE=inverse, NORM=norm_weights is not None, **config,
        )  # fmt: skip


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def qk_norm_rope_backward_launch(
    grad_q_out: Tensor,
    grad_k_out: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    interleaved: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, q_weight and k_weight through the fused QK-RMSNorm + rotation."""
    n_tokens, q_heads, head_dim = q.shape
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [N, Hq, D]
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [N, Hk, D]
    if n_tokens == 0:
        return grad_q, grad_k, torch.zeros_like(q_weight), torch.zeros_like(k_weight)
    interpret = interpreter_enabled()
    # Half the forward's tile: the backward keeps about twice as many fp32 tiles live.
    config = _launch_config(q_heads, k.shape[1], head_dim, interpret, tile_pairs=1024)
    blocks = _cdiv(n_tokens, config["BLOCK_N"])
    # A persistent grid: a few programs per SM, each summing its share of dL/dw in registers.
    programs = min(blocks, 2 if interpret or q.device.type != "cuda" else 4 * _multiprocessors(q.device))
    # Every program owns at least one block, so every row is written.
    partial_q = torch.empty(programs, head_dim, dtype=torch.float32, device=q.device)  # [programs, D]
    partial_k = torch.empty(programs, head_dim, dtype=torch.float32, device=q.device)
    with _device_guard(q):
        kernel_module(interpret).qk_norm_rope_backward_kernel[(programs,)](
            grad_q_out, grad_k_out, q, k, q_weight, k_weight, positions,
            grad_q, grad_k, partial_q, partial_k,
            n_tokens, q_heads, k.shape[1],
            grad_q_out.stride(0), grad_q_out.stride(1), grad_k_out.stride(0), grad_k_out.stride(1),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            grad_q.stride(0), grad_q.stride(1), grad_k.stride(0), grad_k.stride(1), positions.stride(0),
            eps,
            HEAD_DIM=head_dim, BANDS=tuple(bands), THETA=tuple(theta), INTERLEAVED=interleaved, **config,
        )  # fmt: skip
    return grad_q, grad_k, partial_q.sum(0).to(q_weight.dtype), partial_k.sum(0).to(k_weight.dtype)


# ----------------------------------------------------------------------------------------------------
# torch.library ops (the units torch.compile sees) and their autograd


def _empty_like_contiguous(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("imontage::rope", mutates_args=())
def rope_op(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    interleaved: bool,
    inverse: bool,
) -> tuple[Tensor, Tensor]:
    """q ``[N, Hq, D]``, k ``[N, Hk, D]`` rotated by positions ``[N, A]`` (by −angle if ``inverse``)."""
    q, k, positions = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(positions)
    q_out, k_out = _empty_like_contiguous(q), _empty_like_contiguous(k)
    rope_launch(q, k, q_out, k_out, positions, bands, theta, interleaved, inverse=inverse)
    return q_out, k_out


@rope_op.register_fake
def _(q, k, positions, bands, theta, interleaved, inverse):
    return _empty_like_contiguous(q), _empty_like_contiguous(k)


def _rope_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, _, positions, bands, theta, interleaved, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.rope_args = (bands, theta, interleaved, inverse)


def _rope_backward(ctx: Any, grad_q_out: Tensor, grad_k_out: Tensor) -> tuple[Tensor | None, ...]:
    """A rotation is orthogonal: its backward is the rotation by the opposite angles."""
    (positions,) = ctx.saved_tensors
    bands, theta, interleaved, inverse = ctx.rope_args
    grad_q, grad_k = rope_op(grad_q_out, grad_k_out, positions, bands, theta, interleaved, not inverse)
    return grad_q, grad_k, None, None, None, None, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


@torch.library.custom_op("imontage::rope_", mutates_args=("q", "k"))
def rope_inplace_op(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    interleaved: bool,
) -> None:
    """Rotates q ``[N, Hq, D]`` and k ``[N, Hk, D]`` in place; pairs beyond the bands are not touched."""
    rope_launch(q, k, q, k, _last_dim_contiguous(positions), bands, theta, interleaved)


@rope_inplace_op.register_fake
def _(q, k, positions, bands, theta, interleaved):
    return None


class RopeInplaceFunction(torch.autograd.Function):
    """In-place rotation under autograd (a mutating op cannot carry ``register_autograd``).

    Nothing is saved but the positions: the backward is the inverse rotation of the gradients.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        positions: Tensor,
        bands: tuple[int, ...],
        theta: tuple[float, ...],
        interleaved: bool,
    ) -> tuple[Tensor, Tensor]:
        rope_inplace_op(
            q.view(-1, *q.shape[-2:]), k.view(-1, *k.shape[-2:]), positions, bands, theta, interleaved
        )
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(positions)
        ctx.rope_args = (bands, theta, interleaved)
        return q, k

    @staticmethod
    def backward(ctx: Any, grad_q: Tensor, grad_k: Tensor) -> tuple[Tensor | None, ...]:
        (positions,) = ctx.saved_tensors
        bands, theta, interleaved = ctx.rope_args
        q_shape, k_shape = grad_q.shape, grad_k.shape
        grad_q, grad_k = rope_op(
            grad_q.reshape(-1, *q_shape[-2:]), grad_k.reshape(-1, *k_shape[-2:]),
            positions, bands, theta, interleaved, True,
        )  # fmt: skip
        return grad_q.view(q_shape), grad_k.view(k_shape), None, None, None, None


@torch.library.custom_op("imontage::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    interleaved: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``rotate(rms_norm(q) · q_weight)`` and the same for k, per head, in one launch."""
    q, k, positions = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(positions)
    q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    q_out, k_out = _empty_like_contiguous(q), _empty_like_contiguous(k)
    rope_launch(
        q, k, q_out, k_out, positions, bands, theta, interleaved, norm_weights=(q_weight, k_weight), eps=eps
    )
    return q_out, k_out


@qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, positions, bands, theta, interleaved, eps):
    return _empty_like_contiguous(q), _empty_like_contiguous(k)


@torch.library.custom_op("imontage::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward_op(
    grad_q_out: Tensor,
    grad_k_out: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    interleaved: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, q_weight, k_weight through :func:`qk_norm_rope_op`."""
    grad_q_out, grad_k_out = _last_dim_contiguous(grad_q_out), _last_dim_contiguous(grad_k_out)
    q, k, positions = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(positions)
    q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    return qk_norm_rope_backward_launch(
        grad_q_out, grad_k_out, q, k, q_weight, k_weight, positions, bands, theta, interleaved, eps
    )


@qk_norm_rope_backward_op.register_fake
def _(grad_q_out, grad_k_out, q, k, q_weight, k_weight, positions, bands, theta, interleaved, eps):
    return (
        _empty_like_contiguous(q),
        _empty_like_contiguous(k),
        torch.empty_like(q_weight),
        torch.empty_like(k_weight),
    )


def _qk_norm_rope_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, q_weight, k_weight, positions, bands, theta, interleaved, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, positions)  # the norm's backward needs its input
    ctx.rope_args = (bands, theta, interleaved, eps)


def _qk_norm_rope_backward(ctx: Any, grad_q_out: Tensor, grad_k_out: Tensor) -> tuple[Tensor | None, ...]:
    q, k, q_weight, k_weight, positions = ctx.saved_tensors
    grads = qk_norm_rope_backward_op(
        grad_q_out, grad_k_out, q, k, q_weight, k_weight, positions, *ctx.rope_args
    )
    return (*grads, None, None, None, None, None)


qk_norm_rope_op.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup_context)


# ----------------------------------------------------------------------------------------------------
# Entry points


def _tokens_view(x: Tensor) -> Tensor:
    """``[N, H, D]`` or ``[B, S, H, D]`` -> ``[N·, H, D]`` (a view when the strides allow, else a copy)."""
    return x.reshape(-1, *x.shape[-2:])


def multi_axis_rope(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    pair_layout: str = "half",
    *,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotate q and k by their tokens' multi-axis positions (DESIGN.md, "Positions").

    Args:
        q: ``[N, Hq, D]`` packed tokens (the ``cu_seqlens`` packing needs nothing here: positions are
            per token) or ``[B, S, Hq, D]``; float32, bfloat16 or float16 (arithmetic in fp32).
        k: the same tokens with their own head count ``Hk``.
        positions: ``[N, A]`` or ``[B, S, A]`` int32, one column per entry of ``bands``.
        bands: rotary pairs per axis (1 to 4 axes); pairs beyond ``sum(bands)`` are copied unchanged.
        theta: the base of each axis.
        pair_layout: ``half`` (x[i], x[i + D/2]) or ``interleaved`` (x[2i], x[2i+1]).
        inplace: rotate q and k in place (and return them).

    Returns the rotated q and k, shaped and typed like the inputs. Differentiable; CUDA tensors run
    the fused kernel, CPU tensors the PyTorch reference unless ``TRITON_INTERPRET=1``.
    """
    bands, theta, interleaved = check_rope_args(bands, theta, pair_layout, q.shape[-1])
    _check_activations(q, k, positions, len(bands))
    positions = positions.reshape(-1, len(bands))  # [N, A]
    if not kernel_enabled(q):
        q_out = apply_rope(_tokens_view(q), positions, bands, theta, pair_layout).view(q.shape)
        k_out = apply_rope(_tokens_view(k), positions, bands, theta, pair_layout).view(k.shape)
        return (q.copy_(q_out), k.copy_(k_out)) if inplace else (q_out, k_out)
    _check_kernel_inputs(q, k)
    if inplace:
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("in-place RoPE needs q and k contiguous in the head dim")
        try:
            q.view(-1, *q.shape[-2:]), k.view(-1, *k.shape[-2:])
        except RuntimeError as e:
            raise ValueError("in-place RoPE needs [B, S, H, D] q and k whose (B, S) dims flatten") from e
        return RopeInplaceFunction.apply(q, k, positions, bands, theta, interleaved)
    q_out, k_out = rope_op(_tokens_view(q), _tokens_view(k), positions, bands, theta, interleaved, False)
    return q_out.view(q.shape), k_out.view(k.shape)


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    positions: Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    pair_layout: str = "half",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm with weights ``[D]`` on q and k, then :func:`multi_axis_rope`, fused.

    Same layouts and dispatch as :func:`multi_axis_rope`; on the reference path it is exactly
    ``apply_rope(F.rms_norm(q, (D,), q_weight, eps))`` (what ``nn.RMSNorm`` computes).
    Differentiable in q, k and both weights.
    """
    head_dim = q.shape[-1]
    bands, theta, interleaved = check_rope_args(bands, theta, pair_layout, head_dim)
    _check_activations(q, k, positions, len(bands))
    _check_norm_weights(q_weight, k_weight, head_dim, q.device)
    positions = positions.reshape(-1, len(bands))  # [N, A]
    if not kernel_enabled(q):
        q_normed = F.rms_norm(_tokens_view(q), (head_dim,), q_weight, eps)
        k_normed = F.rms_norm(_tokens_view(k), (head_dim,), k_weight, eps)
        q_out = apply_rope(q_normed, positions, bands, theta, pair_layout)
        k_out = apply_rope(k_normed, positions, bands, theta, pair_layout)
        return q_out.view(q.shape), k_out.view(k.shape)
    _check_kernel_inputs(q, k, q_weight, k_weight)
    q_out, k_out = qk_norm_rope_op(
        _tokens_view(q), _tokens_view(k), q_weight, k_weight, positions, bands, theta, interleaved, float(eps)
    )
    return q_out.view(q.shape), k_out.view(k.shape)

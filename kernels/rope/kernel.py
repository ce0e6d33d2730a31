"""Triton kernels of the multi-axis RoPE: rotation of q and k, and per-head RMSNorm fused with it.

Notation (DESIGN.md, "Positions"): N tokens, H heads (q and k may have different head counts, as in
GQA), D the head dim, P = D/2 rotary pairs, R = sum(BANDS) rotated pairs. Pair p is (x[p], x[p + P]) in
the half layout and (x[2p], x[2p + 1]) in the interleaved one. Pair p < R belongs to axis a when
start_a <= p < start_a + BANDS[a] and, with j = p − start_a, turns by pos[n, a] · THETA[a]^(−j / BANDS[a]).
Pairs p >= R are not rotated.

A program owns BLOCK_N consecutive tokens. It computes their angles once from the integer positions
(no cos/sin table is read), ``[BLOCK_N, BLOCK_P]``, then applies them to every head of q and then of k,
BLOCK_H heads at a time, as ``[BLOCK_N, BLOCK_H, BLOCK_P]`` tiles of first and second pair elements held
in fp32. BANDS and THETA are compile-time tuples: each model configuration gets its own specialised
kernel in which the per-pair axis lookup folds away.

Rows are addressed by (token, head) strides with the last dim contiguous, so q and k may be strided
views (e.g. slices of a fused qkv projection); token offsets are computed in int64 because
N · stride passes 2^31 at video lengths.

Only Triton builtins are called. ``tl.sum``, ``tl.zeros`` and ``tl.cdiv`` are themselves
``@triton.jit`` functions, decorated for the mode (compiled or interpreted) that was active when
triton was imported, and a kernel decorated for the other mode cannot call them (ops.py decorates
this module per mode). Sums go through ``tl.reduce`` with triton's own add combiner, which the
interpreter recognises and runs as one numpy sum.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

_add = tl.standard._sum_combine  # see the module docstring: the interpreter runs it as a numpy sum


@triton.jit
def _sum(x, axis: tl.constexpr, keep_dims: tl.constexpr = False):
    """``tl.sum`` for fp32 tiles, callable from kernels of either mode."""
    return tl.reduce(x, axis, _add, keep_dims=keep_dims)


@triton.constexpr_function
def _band_start(bands, axis):
    """Index of the first pair of ``axis``'s band."""
    return sum(bands[:axis])


@triton.constexpr_function
def _rotated_pairs(bands):
    return sum(bands)


@triton.constexpr_function
def _log2_inv_freq_step(theta, count):
    """log2 of θ^(−1/n): pair j of a band of n pairs has inverse frequency exp2(j · step)."""
    return -math.log2(theta) / count


@triton.jit
def _cos_sin(
    pos_ptr,
    stride_pos_n,
    tokens,
    token_mask,
    BANDS: tl.constexpr,
    THETA: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """cos and sin ``[BLOCK_N, 1, BLOCK_P]`` of every pair's angle (negated if INVERSE); unbanded pairs: 0."""
    p = tl.arange(0, BLOCK_P)
    angle = tl.full([BLOCK_N, BLOCK_P], 0.0, tl.float32)
    for axis in tl.static_range(len(BANDS)):
        if BANDS[axis] > 0:  # resolved at compile time: an axis without pairs costs nothing
            start = _band_start(BANDS, axis)
            step = _log2_inv_freq_step(THETA[axis], BANDS[axis])
            inv_freq = tl.exp2((p - start).to(tl.float32) * step)  # [BLOCK_P]
            pos = tl.load(pos_ptr + tokens.to(tl.int64) * stride_pos_n + axis, mask=token_mask, other=0)
            in_band = (p >= start) & (p < start + BANDS[axis])  # [BLOCK_P]
            angle = tl.where(in_band[None, :], pos.to(tl.float32)[:, None] * inv_freq[None, :], angle)
    if INVERSE:  # the backward of a rotation is the rotation by the opposite angle
        angle = -angle
    return tl.cos(angle)[:, None, :], tl.sin(angle)[:, None, :]


@triton.jit
def _load_pairs(
    row_ptr,
    row_mask,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """First and second elements of pairs 0..PAIRS−1 of every row, fp32 ``[A, B, BLOCK_P]`` each.

    ``row_ptr`` ``[A, B, 1]`` points at the first element of each row of HEAD_DIM; masked rows and the
    padding pairs PAIRS..BLOCK_P−1 read as 0.
    """
    if INTERLEAVED:
        # One contiguous load per row (vectorised), then de-interleave in registers.
        d = tl.arange(0, 2 * BLOCK_P)[None, None, :]
        mask = row_mask
        if PAIRS < BLOCK_P:
            mask = mask & (d < 2 * PAIRS)
        row = tl.load(row_ptr + d, mask=mask, other=0.0).to(tl.float32)  # [A, B, 2·BLOCK_P]
        first, second = tl.split(tl.reshape(row, [row.shape[0], row.shape[1], BLOCK_P, 2]))
    else:
        p = tl.arange(0, BLOCK_P)[None, None, :]
        mask = row_mask
        if PAIRS < BLOCK_P:
            mask = mask & (p < PAIRS)
        first = tl.load(row_ptr + p, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(row_ptr + HEAD_DIM // 2 + p, mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _store_pairs(
    row_ptr,
    row_mask,
    first,
    second,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Write pairs 0..PAIRS−1 of ``[A, B, BLOCK_P]`` ``first``/``second`` back in the row's dtype."""
    dtype = row_ptr.dtype.element_ty
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_P)[None, None, :]
        mask = row_mask
        if PAIRS < BLOCK_P:
            mask = mask & (d < 2 * PAIRS)
        row = tl.reshape(tl.join(first, second), [first.shape[0], first.shape[1], 2 * BLOCK_P])
        tl.store(row_ptr + d, row.to(dtype), mask=mask)
    else:
        p = tl.arange(0, BLOCK_P)[None, None, :]
        mask = row_mask
        if PAIRS < BLOCK_P:
            mask = mask & (p < PAIRS)
        tl.store(row_ptr + p, first.to(dtype), mask=mask)
        tl.store(row_ptr + HEAD_DIM // 2 + p, second.to(dtype), mask=mask)


@triton.jit
def _rotate(first, second, cos, sin, ROTATED: tl.constexpr, BLOCK_P: tl.constexpr):
    """Turn every pair by its angle; pairs from ROTATED on keep their exact values."""
    turned_first = first * cos - second * sin
    turned_second = first * sin + second * cos
    if ROTATED < BLOCK_P:  # cos = 1, sin = 0 would still turn an inf into a nan: select instead
        rotated = (tl.arange(0, BLOCK_P) < ROTATED)[None, None, :]
        turned_first = tl.where(rotated, turned_first, first)
        turned_second = tl.where(rotated, turned_second, second)
    return turned_first, turned_second


@triton.jit
def _rope_heads(
    x_ptr,
    out_ptr,
    weight_ptr,
    n_heads,
    stride_x_n,
    stride_x_h,
    stride_out_n,
    stride_out_h,
    tokens,
    token_mask,
    cos,
    sin,
    eps,
    HEAD_DIM: tl.constexpr,
    ROTATED: tl.constexpr,
    PAIRS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """(RMSNorm then) rotation of every head of one tensor for the program's tokens."""
    rows = tokens.to(tl.int64)[:, None, None]  # [BLOCK_N, 1, 1]
    row_mask = token_mask[:, None, None]
    if NORM:
        all_rows = tl.full([1, 1, 1], 1, tl.int1)
        w_first, w_second = _load_pairs(
            weight_ptr + tl.full([1, 1, 1], 0, tl.int32), all_rows, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P
        )  # [1, 1, BLOCK_P] each
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[None, :, None]  # [1, BLOCK_H, 1]
        mask = row_mask & (heads < n_heads)
        first, second = _load_pairs(
            x_ptr + rows * stride_x_n + heads * stride_x_h, mask, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P
        )  # [BLOCK_N, BLOCK_H, BLOCK_P] each
        if NORM:
            mean_square = (_sum(first * first, 2) + _sum(second * second, 2)) / HEAD_DIM
            rstd = tl.rsqrt(mean_square + eps)[:, :, None]  # [BLOCK_N, BLOCK_H, 1]
            first = first * rstd * w_first
            second = second * rstd * w_second
        first, second = _rotate(first, second, cos, sin, ROTATED, BLOCK_P)
        _store_pairs(
            out_ptr + rows * stride_out_n + heads * stride_out_h,
            mask,
            first,
            second,
            HEAD_DIM,
            PAIRS,
            INTERLEAVED,
            BLOCK_P,
        )


@triton.jit
def rope_kernel(
    q_ptr,  # [N, Hq, D]
    k_ptr,  # [N, Hk, D]
    q_out_ptr,  # [N, Hq, D]; q_ptr itself when rotating in place
    k_out_ptr,  # [N, Hk, D]
    q_weight_ptr,  # [D] RMSNorm weight of q (read only when NORM)
    k_weight_ptr,  # [D]
    pos_ptr,  # [N, A] int32 or int64
    n_tokens,
    q_heads,
    k_heads,
    stride_q_n,
    stride_q_h,
    stride_k_n,
    stride_k_h,
    stride_q_out_n,
    stride_q_out_h,
    stride_k_out_n,
    stride_k_out_h,
    stride_pos_n,
    eps,
    HEAD_DIM: tl.constexpr,
    BANDS: tl.constexpr,  # pairs per axis, A <= 4 entries
    THETA: tl.constexpr,  # base per axis
    PAIRS: tl.constexpr,  # pairs read and written per row: D/2, or R when rotating in place
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next power of two >= D/2
):
    """Rotate q and k in one launch: forward (INVERSE=False), backward (INVERSE=True), or, with NORM,
    per-head RMSNorm with weights followed by the rotation. Grid: (cdiv(N, BLOCK_N),)."""
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    token_mask = tokens < n_tokens
    cos, sin = _cos_sin(pos_ptr, stride_pos_n, tokens, token_mask, BANDS, THETA, INVERSE, BLOCK_N, BLOCK_P)
    ROTATED: tl.constexpr = _rotated_pairs(BANDS)
    _rope_heads(
        q_ptr, q_out_ptr, q_weight_ptr, q_heads, stride_q_n, stride_q_h, stride_q_out_n, stride_q_out_h,
        tokens, token_mask, cos, sin, eps,
        HEAD_DIM, ROTATED, PAIRS, INTERLEAVED, NORM, BLOCK_H, BLOCK_P,
    )  # fmt: skip
    _rope_heads(
        k_ptr, k_out_ptr, k_weight_ptr, k_heads, stride_k_n, stride_k_h, stride_k_out_n, stride_k_out_h,
        tokens, token_mask, cos, sin, eps,
        HEAD_DIM, ROTATED, PAIRS, INTERLEAVED, NORM, BLOCK_H, BLOCK_P,
    )  # fmt: skip


@triton.jit
def _norm_rope_backward_heads(
    grad_out_ptr,
    x_ptr,
    grad_x_ptr,
    w_first,
    w_second,
    grad_w_first,
    grad_w_second,
    n_heads,
    stride_grad_out_n,
    stride_grad_out_h,
    stride_x_n,
    stride_x_h,
    stride_grad_x_n,
    stride_grad_x_h,
    tokens,
    token_mask,
    cos,
    sin,
    eps,
    HEAD_DIM: tl.constexpr,
    ROTATED: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Gradients through y = rotate(x̂ · w), x̂ = x · rstd, for every head of one tensor.

    ``cos``/``sin`` are of the negated angles, so ``_rotate`` applies Rᵀ. Returns the running sums of
    dL/dw, ``[1, 1, BLOCK_P]`` per pair element.
    """
    PAIRS: tl.constexpr = HEAD_DIM // 2
    rows = tokens.to(tl.int64)[:, None, None]
    row_mask = token_mask[:, None, None]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        mask = row_mask & (heads < n_heads)
        g_first, g_second = _load_pairs(
            grad_out_ptr + rows * stride_grad_out_n + heads * stride_grad_out_h,
            mask,
            HEAD_DIM,
            PAIRS,
            INTERLEAVED,
            BLOCK_P,
        )
        g_first, g_second = _rotate(g_first, g_second, cos, sin, ROTATED, BLOCK_P)  # dL/dy_norm
        x_first, x_second = _load_pairs(
            x_ptr + rows * stride_x_n + heads * stride_x_h, mask, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P
        )
        mean_square = (_sum(x_first * x_first, 2) + _sum(x_second * x_second, 2)) / HEAD_DIM
        rstd = tl.rsqrt(mean_square + eps)[:, :, None]  # [BLOCK_N, BLOCK_H, 1]
        n_first = x_first * rstd  # x̂, [BLOCK_N, BLOCK_H, BLOCK_P]
        n_second = x_second * rstd
        grad_w_first += _sum(_sum(g_first * n_first, 1, True), 0, True)
        grad_w_second += _sum(_sum(g_second * n_second, 1, True), 0, True)
        gw_first = g_first * w_first  # dL/dx̂
        gw_second = g_second * w_second
        # dL/dx = rstd · (dL/dx̂ − x̂ · mean(dL/dx̂ · x̂)) over the head dim
        proj = (_sum(gw_first * n_first, 2) + _sum(gw_second * n_second, 2)) / HEAD_DIM
        proj = proj[:, :, None]
        _store_pairs(
            grad_x_ptr + rows * stride_grad_x_n + heads * stride_grad_x_h,
            mask,
            rstd * (gw_first - n_first * proj),
            rstd * (gw_second - n_second * proj),
            HEAD_DIM,
            PAIRS,
            INTERLEAVED,
            BLOCK_P,
        )
    return grad_w_first, grad_w_second


@triton.jit
def qk_norm_rope_backward_kernel(
    grad_q_out_ptr,  # [N, Hq, D]
    grad_k_out_ptr,  # [N, Hk, D]
    q_ptr,  # [N, Hq, D] forward input (before the norm)
    k_ptr,  # [N, Hk, D]
    q_weight_ptr,  # [D]
    k_weight_ptr,  # [D]
    pos_ptr,  # [N, A]
    grad_q_ptr,  # [N, Hq, D]
    grad_k_ptr,  # [N, Hk, D]
    grad_q_weight_ptr,  # [programs, D] fp32 partial sums, one row per program (summed on the host)
    grad_k_weight_ptr,  # [programs, D]
    n_tokens,
    q_heads,
    k_heads,
    stride_grad_q_out_n,
    stride_grad_q_out_h,
    stride_grad_k_out_n,
    stride_grad_k_out_h,
    stride_q_n,
    stride_q_h,
    stride_k_n,
    stride_k_h,
    stride_grad_q_n,
    stride_grad_q_h,
    stride_grad_k_n,
    stride_grad_k_h,
    stride_pos_n,
    eps,
    HEAD_DIM: tl.constexpr,
    BANDS: tl.constexpr,
    THETA: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Backward of the fused QK-RMSNorm + rotation. Persistent grid: (programs,), each program walks the
    token blocks pid, pid + programs, ... and writes one row of weight-gradient partial sums, so the
    reduction is deterministic and its buffer small."""
    pid = tl.program_id(0)
    ROTATED: tl.constexpr = _rotated_pairs(BANDS)
    PAIRS: tl.constexpr = HEAD_DIM // 2
    all_rows = tl.full([1, 1, 1], 1, tl.int1)
    zero = tl.full([1, 1, 1], 0, tl.int32)
    wq_first, wq_second = _load_pairs(q_weight_ptr + zero, all_rows, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P)
    wk_first, wk_second = _load_pairs(k_weight_ptr + zero, all_rows, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P)
    gwq_first = tl.full([1, 1, BLOCK_P], 0.0, tl.float32)
    gwq_second = tl.full([1, 1, BLOCK_P], 0.0, tl.float32)
    gwk_first = tl.full([1, 1, BLOCK_P], 0.0, tl.float32)
    gwk_second = tl.full([1, 1, BLOCK_P], 0.0, tl.float32)
    for block in range(pid, (n_tokens + BLOCK_N - 1) // BLOCK_N, tl.num_programs(0)):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        token_mask = tokens < n_tokens
        cos, sin = _cos_sin(pos_ptr, stride_pos_n, tokens, token_mask, BANDS, THETA, True, BLOCK_N, BLOCK_P)
        gwq_first, gwq_second = _norm_rope_backward_heads(
            grad_q_out_ptr, q_ptr, grad_q_ptr, wq_first, wq_second, gwq_first, gwq_second, q_heads,
            stride_grad_q_out_n, stride_grad_q_out_h, stride_q_n, stride_q_h, stride_grad_q_n, stride_grad_q_h,
            tokens, token_mask, cos, sin, eps,
            HEAD_DIM, ROTATED, INTERLEAVED, BLOCK_H, BLOCK_P,
        )  # fmt: skip
        gwk_first, gwk_second = _norm_rope_backward_heads(
            grad_k_out_ptr, k_ptr, grad_k_ptr, wk_first, wk_second, gwk_first, gwk_second, k_heads,
            stride_grad_k_out_n, stride_grad_k_out_h, stride_k_n, stride_k_h, stride_grad_k_n, stride_grad_k_h,
            tokens, token_mask, cos, sin, eps,
            HEAD_DIM, ROTATED, INTERLEAVED, BLOCK_H, BLOCK_P,
        )  # fmt: skip
    row = pid * HEAD_DIM + zero  # [1, 1, 1]
    _store_pairs(
        grad_q_weight_ptr + row, all_rows, gwq_first, gwq_second, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P
    )
    _store_pairs(
        grad_k_weight_ptr + row, all_rows, gwk_first, gwk_second, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_P
    )

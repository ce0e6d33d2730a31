"""Multi-axis rotary position embedding in PyTorch: the reference the fused kernels are tested
against, and what they run on CPU tensors unless ``TRITON_INTERPRET=1``.

The head dimension D has D/2 rotary pairs, split into bands of ``bands[a]`` pairs per axis in
axis order (s, t, h, w); pairs beyond the bands are not rotated. Pair j of axis a turns by
``p_a · theta_a^(−j / bands[a])``. A pair is (x[i], x[i + D/2]) in the ``half`` layout and
(x[2i], x[2i+1]) in the ``interleaved`` layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_inverse_frequencies(
    bands: Sequence[int], theta: Sequence[float], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rotated pair: its axis ``[R]`` int64 and inverse frequency ``[R]``, R = sum(bands)."""
    axes, inv_freq = [], []
    for axis, (count, base) in enumerate(zip(bands, theta, strict=True)):
        if count == 0:
            continue
        j = torch.arange(count, dtype=torch.float64)
        inv_freq.append(float(base) ** (-j / count))
        axes.append(torch.full((count,), axis, dtype=torch.int64))
    if not axes:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype)
    return torch.cat(axes), torch.cat(inv_freq).to(dtype)


def rope_angles(
    positions: torch.Tensor, bands: Sequence[int], theta: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[N, 4]`` integer positions -> ``[N, R]`` rotation angles of the R = sum(bands) rotated pairs."""
    axes, inv_freq = rope_inverse_frequencies(bands, theta, dtype)
    axes, inv_freq = axes.to(positions.device), inv_freq.to(positions.device)
    return positions[:, axes].to(dtype) * inv_freq  # [N, R]


def _pairs(x: torch.Tensor, pair_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second element of every pair, ``[..., D/2]`` each."""
    if pair_layout == "half":
        return x.chunk(2, dim=-1)  # type: ignore[return-value]
    if pair_layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    raise ValueError(f"unknown RoPE pair layout '{pair_layout}' (layouts: half, interleaved)")


def _unpairs(first: torch.Tensor, second: torch.Tensor, pair_layout: str) -> torch.Tensor:
    if pair_layout == "half":
        return torch.cat([first, second], dim=-1)
    return torch.stack([first, second], dim=-1).flatten(-2)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    bands: Sequence[int],
    theta: Sequence[float],
    pair_layout: str = "half",
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rotate ``x`` ``[N, H, D]`` by ``positions`` ``[N, 4]``; returns a new tensor of x's dtype.

    Arithmetic runs in ``compute_dtype`` (float64 for a test oracle).
    """
    head_dim = x.shape[-1]
    rotated = sum(bands)
    if head_dim % 2 or rotated > head_dim // 2:
        raise ValueError(f"head dim {head_dim} cannot hold {rotated} rotary pairs")
    angles = rope_angles(positions, bands, theta, compute_dtype)[:, None, :]  # [N, 1, R]
    cos, sin = angles.cos(), angles.sin()
    first, second = _pairs(x.to(compute_dtype), pair_layout)  # [N, H, D/2] each
    r1, r2 = first[..., :rotated], second[..., :rotated]
    if rotated == head_dim // 2:  # every pair turns (Wan's bands): no pass-through pairs to join
        first, second = r1 * cos - r2 * sin, r1 * sin + r2 * cos
    else:
        first = torch.cat([r1 * cos - r2 * sin, first[..., rotated:]], dim=-1)
        second = torch.cat([r1 * sin + r2 * cos, second[..., rotated:]], dim=-1)
    return _unpairs(first, second, pair_layout).to(x.dtype)

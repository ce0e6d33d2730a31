"""Multi-axis rotary position embedding as a module: a model's bands, bases and pair layout.

The rotation itself, and its PyTorch reference (the oracle for the fused kernel), are in
:mod:`imontage.kernels.rope` (``reference.py``: the formulas of DESIGN.md, "Positions").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from imontage.kernels.rope import multi_axis_rope, qk_norm_rope


class MultiAxisRope(torch.nn.Module):
    """Rotates q and k with a model's bands, bases and pair layout.

    CUDA tensors run the fused Triton kernel (:mod:`imontage.kernels.rope`); CPU tensors run
    the reference (:func:`imontage.kernels.rope.reference.apply_rope`) unless ``TRITON_INTERPRET=1``
    (the kernel through Triton's interpreter).
    """

    def __init__(self, bands: Sequence[int], theta: Sequence[float], pair_layout: str = "half") -> None:
        super().__init__()
        self.bands = tuple(int(b) for b in bands)
        self.theta = tuple(float(t) for t in theta)
        self.pair_layout = pair_layout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[N, Hq, D]``, k ``[N, Hk, D]``, positions ``[N, A]`` -> rotated q and k."""
        return multi_axis_rope(q, k, positions, self.bands, self.theta, self.pair_layout)

    def normed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        q_norm: torch.nn.RMSNorm,
        k_norm: torch.nn.RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(q_norm(q), k_norm(k), positions)``, as one fused launch on the kernel path."""
        if q_norm.weight is None or k_norm.weight is None:
            return self(q_norm(q), k_norm(k), positions)
        eps = q_norm.eps if q_norm.eps is not None else torch.finfo(q.dtype).eps
        if k_norm.eps != q_norm.eps:
            raise ValueError(f"q_norm and k_norm must share eps, got {q_norm.eps} and {k_norm.eps}")
        return qk_norm_rope(
            q, k, q_norm.weight, k_norm.weight, positions, self.bands, self.theta, self.pair_layout, eps
        )

    def extra_repr(self) -> str:
        return f"bands={self.bands}, theta={self.theta}, pair_layout={self.pair_layout}"

"""megatron-core's tensor-parallel linears on packed ``[n, features]`` rows.

A module of their own so that importing :mod:`imontage.parallel.parallelize` does not import
megatron-core: its package import costs about 3.7 CPU-seconds (its layers pull in torch's
compiler stack), which every tool that reads a checkpoint paid before printing anything (``--help``
of ``imontage-sample``, ``imontage-imagic``, ``tools/convert_checkpoint.py`` and ``tools/plan.py``
took 6 to 6.5 CPU-seconds, 2.1 to 2.3 without it). ``parallelize`` imports this module when it
cuts a layer.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class ColumnParallelProjection(ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` on packed ``[n, in]`` rows: weight rows split over TP.

    Megatron works on ``[s, b, h]``; a packed batch is one sequence of ``n`` tokens, ``b = 1``.
    Under SP the input is this rank's ``n/TP`` rows and the layer all-gathers them first.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x.unsqueeze(1))
        return out.squeeze(1)


class RowParallelProjection(RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` on packed rows: weight columns split over TP.

    The partial products are all-reduced (reduce-scattered to ``n/TP`` rows under SP), then the
    whole bias is added.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x.unsqueeze(1))
        return out.squeeze(1)

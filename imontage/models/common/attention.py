"""Block-diagonal attention over a packed batch: no token attends across ``cu_seqlens``.

flash-attn's varlen kernel on CUDA when it is installed (and asked for or left to ``auto``);
otherwise PyTorch SDPA, one sequence at a time. Both compute the same softmax attention; the
backend in use is logged once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _announce(backend: str) -> None:
    log.info("attention backend: %s", backend)


def resolve_backend(requested: str, q: torch.Tensor) -> str:
    """``flash`` or ``sdpa`` for this call; an explicit ``flash`` that cannot run is an error."""
    flash_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            "attention_backend=flash needs flash-attn installed and CUDA fp16/bf16 inputs "
            f"(installed: {flash_attn_available()}, device: {q.device}, dtype: {q.dtype})"
        )
    backend = "flash" if requested in ("flash", "auto") and flash_ok else "sdpa"
    _announce(backend)
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str = "auto",
    bounds: Sequence[int] | None = None,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    bounds_k: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax attention of ``[N, H, D]`` q, k, v within each packed sequence; returns ``[N, H, D]``.

    ``bounds``: ``cu_seqlens`` as Python ints, when the caller already has them (it saves a device
    sync per call on the SDPA path).

    Cross-attention: ``cu_seqlens_k`` (with ``max_seqlen_k`` and optionally ``bounds_k``) packs k
    and v ``[M, H, D]`` apart from q; sequence i of q attends to sequence i of k. Without it, k and v
    share q's packing (self-attention). On the SDPA path a query sequence with no keys gets zeros.
    """
    cross = cu_seqlens_k is not None
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k, bounds_k = cu_seqlens, max_seqlen, bounds
    if resolve_backend(backend, q) == "flash":
        from flash_attn import flash_attn_varlen_func

        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item())
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k)
    if bounds is None:
        bounds = cu_seqlens.tolist()
    if bounds_k is None:
        bounds_k = cu_seqlens_k.tolist() if cross else bounds
    outputs = []
    spans = zip(bounds[:-1], bounds[1:], bounds_k[:-1], bounds_k[1:], strict=True)
    for start, end, start_k, end_k in spans:
        if end == start:
            continue
        if end_k == start_k:  # nothing to attend to
            outputs.append(q.new_zeros(end - start, q.shape[1], v.shape[-1]))
            continue
        # [1, H, L, D] per sequence: each sample attends only to itself (or to its own keys).
        qs = q[start:end].transpose(0, 1).unsqueeze(0)
        ks, vs = (t[start_k:end_k].transpose(0, 1).unsqueeze(0) for t in (k, v))
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs).squeeze(0).transpose(0, 1))
    if len(outputs) == 1:  # one sequence (one sample): SDPA's output as it is, not copied by a cat
        return outputs[0]
    return torch.cat(outputs) if outputs else torch.empty_like(q)


class CoreAttention(nn.Module):
    """Softmax attention of ``[n, h, Dh]`` q, k, v, block-diagonal by ``cu_seqlens``.

    A module of its own so that Ulysses can wrap it with its all-to-alls (``imontage.parallel``).
    """

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        bounds: tuple[int, ...],
    ) -> torch.Tensor:
        max_seqlen = max((b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)), default=0)
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.backend, bounds)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"

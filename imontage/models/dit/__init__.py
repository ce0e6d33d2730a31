"""The single-device DiT: segments, positions, RoPE reference, attention and the model."""

from imontage.models.dit.model import DiT, build_dit, count_parameters
from imontage.models.dit.sequence import (
    PackedBatch,
    PackingSpec,
    Sample,
    Segment,
    pack_samples,
    unpatchify_segments,
)

__all__ = [
    "DiT",
    "PackedBatch",
    "PackingSpec",
    "Sample",
    "Segment",
    "build_dit",
    "count_parameters",
    "pack_samples",
    "unpatchify_segments",
]

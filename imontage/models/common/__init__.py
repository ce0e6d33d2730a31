"""What every model family shares: the packed token sequence and its positions, attention, RoPE,
the feed-forward and timestep modules, the token layout parallelism replaces, and the record a
family registers (:class:`~imontage.models.common.family.ModelFamily`) with its parallel plan."""

from imontage.models.common.sequence import (
    PackedBatch,
    PackingSpec,
    Sample,
    Segment,
    pack_samples,
    unpatchify_segments,
)

__all__ = ["PackedBatch", "PackingSpec", "Sample", "Segment", "pack_samples", "unpatchify_segments"]

"""Training data: WebDataset shards streamed, decoded, bucketed and packed into batches, resumably.

Modules, in data-flow order: ``shards`` (specs, tar reading), ``records`` (the sample json),
``media`` and ``buckets`` and ``decode`` (bytes to trained tensors), ``index`` and ``catalog``
(what each shard holds), ``plan`` (who reads what in an epoch), ``packing``, ``stream`` (one
worker), ``mixture`` and ``loader`` (the main process). What writes shards (the latent encoder, the
synthetic data, the tests' shards) is :mod:`imontage.dataprep`.
"""

from imontage.data.decode import decode_sample
from imontage.data.loader import build_loader, heldout_items, load_image, preview_samples
from imontage.data.shards import expand_shards

__all__ = [
    "build_loader",
    "decode_sample",
    "expand_shards",
    "heldout_items",
    "load_image",
    "preview_samples",
]

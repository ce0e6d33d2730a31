"""Training data: WebDataset shards read, decoded and packed into batches; embedded synthetic data."""

from imontage.data.reader import build_loader, decode_sample, expand_shards, load_image, preview_samples

__all__ = ["build_loader", "decode_sample", "expand_shards", "load_image", "preview_samples"]

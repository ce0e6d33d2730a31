"""Packing under a token budget: the packer's choices, and padding over an epoch of mixed images and videos."""

from __future__ import annotations

from pathlib import Path

import pytest

from imontage.config.schema import BucketConfig, DataConfig
from imontage.data import build_loader
from imontage.data.loader import StreamLoader
from imontage.data.packing import TokenPacker
from imontage.dataprep.testing import MIXED_BUCKETS, write_mixed_shards
from imontage.models.common.sequence import PackingSpec

SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="video3d")


def item(tokens: int, samples: int = 1) -> tuple[int, int]:
    return tokens, samples


def packer_with(max_tokens: int, max_samples: int, *items: tuple[int, int]) -> TokenPacker[str]:
    packer: TokenPacker[str] = TokenPacker(max_tokens, max_samples, buffer_size=len(items))
    for position, (tokens, samples) in enumerate(items):
        packer.add(position, tokens, samples, f"item {position}")
    return packer


def test_oldest_first_then_largest_that_fits() -> None:
    packer = packer_with(1000, 0, item(300), item(900), item(500), item(200), item(100))
    assert packer.ready()
    assert [entry.position for entry in packer.pop_batch()] == [0, 2, 3]  # 300 + 500 + 200 = 1000
    assert packer.positions() == [1, 4]
    assert [entry.position for entry in packer.pop_batch()] == [1, 4]


def test_sample_cap_and_pairs() -> None:
    capped = packer_with(1000, 2, item(100), item(100), item(100))
    assert [entry.position for entry in capped.pop_batch()] == [0, 1]
    pairs = packer_with(0, 3, item(100, samples=2), item(100, samples=2), item(100))
    assert [entry.position for entry in pairs.pop_batch()] == [0, 2]  # a pair does not fit the third slot
    without_budget: TokenPacker[str] = TokenPacker(0, 4, buffer_size=64)
    for position in range(3):
        without_budget.add(position, 10, 1, f"item {position}")
    assert not without_budget.ready()  # waits for a full batch of 4 samples
    without_budget.add(3, 10, 1, "item 3")
    assert without_budget.ready()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    write_mixed_shards(out, [60, 45, 75, 60], seed=7)
    return out


def test_padding_over_an_epoch_of_mixed_sizes_is_at_most_5_percent(mixed: Path) -> None:
    """Acceptance: images of 6 sizes in 4 buckets, clips of 5-12 frames in 2 buckets of 4 and 8."""
    cfg = DataConfig(
        shards=str(mixed / "mixed-*.tar"),
        max_tokens=2048,
        batch_size=0,
        pack_buffer=48,
        shuffle_buffer=32,
        buckets=BucketConfig(**MIXED_BUCKETS),  # type: ignore[arg-type]
    )
    loader = build_loader(cfg, SPEC)
    assert isinstance(loader, StreamLoader)
    image_buckets = {tuple(size) for size in MIXED_BUCKETS["image"]}
    video_buckets = {tuple(size) for size in MIXED_BUCKETS["video"]}
    shapes = set()
    for _ in range(loader.batches_in_epoch(0)):
        batch = next(loader)
        assert batch.tokens.shape[0] <= 2048
        for span in batch.spans:
            if span.kind == "image":
                assert span.shape[2:] in image_buckets
            elif span.kind == "video":
                assert span.shape[2:] in video_buckets and span.shape[1] in MIXED_BUCKETS["frames"]
            shapes.add((span.kind, span.shape))
    stats = loader.stats()
    print(f"\npadding over an epoch: {stats.padding:.2%} of {stats.batches} batches x 2048 tokens; "
          f"{stats.samples_emitted} of {loader.catalog.num_samples} samples, {len(shapes)} segment shapes")  # fmt: skip
    assert len({shape for kind, shape in shapes if kind == "video"}) >= 3  # a really mixed set
    assert stats.padding <= 0.05

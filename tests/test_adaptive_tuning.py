"""Adaptive Tuning (DreaMontage): keyframe conditions drawn from each clip's stored keyframes, per sample
and epoch, as ``data.keyframes`` declares; the same draws after a resume (imontage/data/keyframes.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save
from test_data_loader import stopped_and_resumed

from imontage.config.schema import DataConfig
from imontage.data.keyframes import KeyframeOptions
from imontage.data.loader import StreamLoader
from imontage.data.shards import ShardWriter
from imontage.models.common.sequence import PackedBatch, PackingSpec

CHANNELS, CLIP, HEIGHT, WIDTH, TEXT = 4, 5, 4, 6, 16
SPEC = PackingSpec(in_channels=CHANNELS, patch_size=(1, 2, 2), max_text_len=8, layout="shared")
COUNTS = [1.0, 2.0, 3.0, 2.0]  # weights of drawing 0, 1, 2, 3 keyframes


def keyframe_sample(index: int) -> dict[str, bytes]:
    """A latent clip of CLIP frames with a standalone keyframe latent stored for every frame."""
    generator = torch.Generator().manual_seed(index)
    tensors = {
        "1.latent.safetensors": ("latent", torch.randn(CHANNELS, CLIP, HEIGHT, WIDTH, generator=generator)),
        "1.keyframes.safetensors": (
            "keyframes",
            torch.randn(CHANNELS, CLIP, HEIGHT, WIDTH, generator=generator),
        ),
        "text.safetensors": ("text_embedding", torch.randn(3, TEXT, generator=generator)),
    }
    members = {member: save({name: tensor}) for member, (name, tensor) in tensors.items()}
    segments = [{"role": "target", "kind": "latent", "member": "1.latent.safetensors", "tensor": "latent",
                 "keyframes": "1.keyframes.safetensors", "keyframe_frames": list(range(CLIP))}]  # fmt: skip
    record = {"task": "video", "text_embedding": "text.safetensors", "segments": segments}
    return {**members, "json": json.dumps(record).encode()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("adaptive")
    for shard in range(2):
        with ShardWriter(folder / f"clips-{shard:06d}.tar") as writer:
            for index in range(12):
                writer.add_sample(f"{shard}{index:05d}", keyframe_sample(12 * shard + index))
    return str(folder / "clips-*.tar")


def config(shards: str, num_workers: int = 0) -> DataConfig:
    cfg = DataConfig(shards=shards, batch_size=3, shuffle_buffer=8, num_workers=num_workers, text_embeddings=True,
                     seed=5)  # fmt: skip
    cfg.keyframes.mode, cfg.keyframes.counts = "adaptive", COUNTS
    return cfg


def draws(batch: PackedBatch) -> list[tuple[int, ...]]:
    """Per sample of the batch, the latent frames of its keyframe condition segments (after text, clip)."""
    out: list[list[int]] = [[] for _ in range(batch.num_samples)]
    for span in batch.spans:
        if span.index >= 2:
            assert span.role == "condition" and span.shape == (CHANNELS, 1, HEIGHT, WIDTH)
            out[span.sample].append(int(batch.positions[span.start, 1]))
    return [tuple(frames) for frames in out]


def take(loader: StreamLoader, count: int) -> list[tuple[int, str, tuple[int, ...], torch.Tensor]]:
    """(epoch, key, drawn frames, tokens) of each sample of the next ``count`` batches."""
    out = []
    for _ in range(count):
        batch = next(loader)
        assert loader.last is not None
        keys = [key for _, key in loader.last.keys]
        bounds = batch.cu_seqlens.tolist()
        for sample, (key, frames) in enumerate(zip(keys, draws(batch), strict=True)):
            out.append((loader.last.epoch, key, frames, batch.tokens[bounds[sample] : bounds[sample + 1]]))
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_draws_are_the_same_after_a_resume(shards: str, num_workers: int) -> None:
    consumed = 3
    uninterrupted, after = stopped_and_resumed(config(shards, num_workers), SPEC, consumed, take)
    assert [row[:3] for row in after] == [row[:3] for row in uninterrupted[consumed * 3 :]]
    for (_, _, _, tokens), (_, _, _, straight) in zip(after, uninterrupted[consumed * 3 :], strict=True):
        assert torch.equal(tokens, straight)
    # The loader's draws are KeyframeOptions.choose's, seeded by (seed, epoch, key, segment) alone.
    options = KeyframeOptions("adaptive", counts=tuple(COUNTS), seed=5)
    for epoch, key, frames, _ in uninterrupted:
        assert frames == options.choose(range(CLIP), CLIP, key, 0, epoch)  # segment 0 of the json
    # ... so a clip seen in two epochs is drawn afresh (here, at least one of them differs).
    by_key: dict[str, dict[int, tuple[int, ...]]] = {}
    for epoch, key, frames, _ in uninterrupted:
        by_key.setdefault(key, {})[epoch] = frames
    assert any(len(set(seen.values())) > 1 for seen in by_key.values() if len(seen) > 1)


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


CHI2_P001 = {
    2: 13.82,
    3: 16.27,
    4: 18.47,
}  # the chi-square distribution's 0.999 quantile by degrees of freedom


def test_the_count_and_position_histograms_over_1000_samples_match_the_declared_distribution() -> None:
    draws_of = 1000
    frames = list(range(CLIP))
    options = KeyframeOptions("adaptive", counts=tuple(COUNTS), seed=3)
    drawn = [options.choose(frames, CLIP, f"{n:06d}", 0, 0) for n in range(draws_of)]
    counts = np.bincount([len(d) for d in drawn], minlength=len(COUNTS))
    expected = np.array(COUNTS) / sum(COUNTS) * draws_of
    assert chi_square(counts, expected) < CHI2_P001[3], counts
    # Positions uniform: each frame is drawn with probability E[k] / CLIP.
    hits = np.bincount([f for d in drawn for f in d], minlength=CLIP)
    mean_k = sum(k * w for k, w in enumerate(COUNTS)) / sum(COUNTS)
    assert chi_square(hits, np.full(CLIP, mean_k / CLIP * draws_of)) < CHI2_P001[4], hits
    assert all(len(set(d)) == len(d) and list(d) == sorted(d) for d in drawn)

    # Declared positions: weights over 3 bins of the clip, frames 0, 1 | 2 | 3, 4 (f / 4 · 3, floored).
    weighted = KeyframeOptions("adaptive", counts=(0.0, 1.0), positions=(1.0, 0.0, 3.0), seed=3)
    one = [weighted.choose(frames, CLIP, f"{n:06d}", 0, 0) for n in range(draws_of)]
    assert all(len(d) == 1 for d in one)
    where = np.bincount([d[0] for d in one], minlength=CLIP)
    assert where[2] == 0  # a bin of weight 0 is never drawn
    share = np.array([1.0, 1.0, 3.0, 3.0]) / 8 * draws_of
    assert chi_square(where[[0, 1, 3, 4]], share) < CHI2_P001[3], where
    # Capped by the clip: 3 keyframes asked of a clip with 2 drawable candidates give those 2.
    capped = KeyframeOptions("adaptive", counts=(0.0, 0.0, 0.0, 1.0), positions=(1.0, 0.0, 0.0), seed=3)
    assert capped.choose(frames, CLIP, "x", 0, 0) == (0, 1) and capped.most(frames, CLIP) == 2

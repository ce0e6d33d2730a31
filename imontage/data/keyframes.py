"""Keyframe conditions of a clip, from the standalone keyframe latents stored beside it (DreaMontage).

``tools/encode_shards.py --keyframes anchors`` / ``--keyframe-stride N`` stores, per target clip, the
latents of some of its frames each encoded alone (``keyframes`` ``[C, K, H, W]``) and the latent frame
each lies in (``keyframe_frames``): :mod:`imontage.dataprep.keyframes`. The recipe's ``data.keyframes``
says which of them condition the clip, and how:

- ``mode``: ``off`` (they are not read), ``stored`` (every stored keyframe), or ``adaptive``
  (Adaptive Tuning: a draw per sample and epoch; ``counts[k]`` weighs drawing ``k`` of them, capped at
  the clip's candidates, ``positions`` weighs where, over equal bins of the clip's length, and the
  draw is seeded by ``(data.seed, epoch, key, segment)`` alone, so a resumed run draws the same).
- ``conditioning``: ``shared`` (each keyframe a clean one-frame condition segment anchored at its latent
  frame, on the target's own positions: layout ``shared``), or ``channel`` (the keyframes laid over
  the target as its channel condition, at their latent frames, with the mask the model's family
  takes: :attr:`PackingSpec.keyframe_condition`, an image-to-video model's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class KeyframeOptions:
    """What a recipe's ``data.keyframes`` says (module doc); ``seed`` is ``data.seed``."""

    mode: str = "off"
    conditioning: str = "shared"
    counts: tuple[float, ...] = (0.0, 1.0)  # weight of drawing k keyframes, k = 0, 1, ...
    positions: tuple[float, ...] = ()  # weights over equal bins of the clip's length; (): uniform
    seed: int = 0

    @classmethod
    def from_config(cls, data_cfg: Any) -> KeyframeOptions:
        keyframes = data_cfg.keyframes
        return cls(
            mode=str(keyframes.mode),
            conditioning=str(keyframes.conditioning),
            counts=tuple(float(w) for w in keyframes.counts),
            positions=tuple(float(w) for w in keyframes.positions),
            seed=int(data_cfg.seed),
        )

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def candidate_weights(self, frames: Sequence[int], clip_frames: int) -> np.ndarray:
        """``[K]`` weight of each candidate (latent frame ``frames[i]`` of a clip of ``clip_frames``)."""
        if not self.positions:
            return np.ones(len(frames))
        bins = len(self.positions)
        last = max(clip_frames - 1, 1)
        return np.array(
            [self.positions[min(int(f / last * bins), bins - 1)] for f in frames], dtype=np.float64
        )

    def most(self, frames: Sequence[int], clip_frames: int) -> int:
        """The most keyframes a clip with candidates ``frames`` is conditioned on (its token budget)."""
        if self.mode == "stored":
            return len(frames)
        if self.mode == "off":
            return 0
        drawable = int((self.candidate_weights(frames, clip_frames) > 0).sum())
        largest = max(k for k, weight in enumerate(self.counts) if weight > 0)
        return min(largest, drawable)

    def choose(
        self, frames: Sequence[int], clip_frames: int, key: str, segment: int, epoch: int
    ) -> tuple[int, ...]:
        """Indices into ``frames`` of the keyframes that condition the clip, ascending."""
        if self.mode == "stored":
            return tuple(range(len(frames)))
        if self.mode == "off" or not frames:
            return ()
        digest = hashlib.sha256(f"{self.seed}/{epoch}/{key}/{segment}".encode()).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
        counts = np.asarray(self.counts, dtype=np.float64)
        weights = self.candidate_weights(frames, clip_frames)
        count = min(int(rng.choice(len(counts), p=counts / counts.sum())), int((weights > 0).sum()))
        if count == 0:
            return ()
        chosen = rng.choice(len(frames), size=count, replace=False, p=weights / weights.sum())
        return tuple(sorted(int(i) for i in chosen))


NO_KEYFRAMES = KeyframeOptions()


def channel_keyframes(
    keyframes: torch.Tensor, frames: Sequence[int], chosen: Sequence[int], clip_frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen keyframe latents laid at their latent frames of a clip of ``clip_frames``:
    ``[C, T, H, W]`` (zeros elsewhere) and the given frames ``[T]`` bool."""
    channels, _, height, width = keyframes.shape
    latents = keyframes.new_zeros(channels, clip_frames, height, width)
    given = torch.zeros(clip_frames, dtype=torch.bool)
    for index in chosen:
        latents[:, frames[index]] = keyframes[:, index]
        given[frames[index]] = True
    return latents, given

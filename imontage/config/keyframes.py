"""DreaMontage keyframe conditions of a recipe's ``data`` section (``data.keyframes``).

What the keys mean is :mod:`imontage.data.keyframes`'s doc (and docs/data.md, "Keyframes"); this
module holds the schema only, so that the recipe schema imports nothing above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MODES = ("off", "stored", "adaptive")
CONDITIONINGS = ("shared", "channel")


@dataclass
class KeyframesConfig:
    # off: stored keyframes are not read; stored: every one conditions its clip; adaptive: a draw
    # per sample and epoch (Adaptive Tuning), from the weights below.
    mode: str = "off"
    # shared: clean one-frame condition segments on the target's positions (layout shared);
    # channel: laid in an image-to-video model's channel condition at their latent frames, with its mask.
    conditioning: str = "shared"
    counts: list[float] = field(default_factory=lambda: [0.0, 1.0])  # weight of k keyframes, k = 0, 1, ...
    positions: list[float] = field(default_factory=list)  # weights over equal bins of the clip; []: uniform


def keyframe_problems(
    keyframes: Any, layout: str, temporal_patch: int, channel: bool
) -> list[tuple[str, str]]:
    """(key under ``data.keyframes``, reason) for each setting that cannot run on the model: its
    positions ``layout``, ``patch_size[0]`` and whether it takes keyframes in its channels."""
    problems = []
    if keyframes.mode not in MODES:
        problems.append(("mode", f"'{keyframes.mode}' is not one of {', '.join(MODES)}"))
    if keyframes.conditioning not in CONDITIONINGS:
        problems.append(
            ("conditioning", f"'{keyframes.conditioning}' is not one of {', '.join(CONDITIONINGS)}")
        )
    for name in ("counts", "positions"):
        weights = [float(w) for w in keyframes[name]]
        if any(not math.isfinite(w) or w < 0 for w in weights):
            problems.append((name, f"weights {weights} must be finite and >= 0"))
        elif (weights or name == "counts") and sum(weights) <= 0:
            problems.append((name, f"weights {weights} must not all be 0"))
    if keyframes.mode == "off" or problems:
        return problems
    if keyframes.conditioning == "shared" and (layout != "shared" or temporal_patch != 1):
        problems.append(("conditioning", "shared keyframes are one-frame condition segments on the target's "
                         f"positions: they need model.positions.layout=shared and patch_size[0] = 1 (got "
                         f"{layout}, {temporal_patch})"))  # fmt: skip
    if keyframes.conditioning == "channel" and not channel:
        problems.append(("conditioning", "the model takes no channel condition to lay keyframes in "
                         "(an image-to-video model's mask and condition channels)"))  # fmt: skip
    return problems

"""Dataset weights that change with the training step (the CocktailMix curriculum uses this)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from imontage.data.plan import MIXTURE_STREAM, seeded_rng


class MixtureSchedule:
    """Weights of named datasets as a function of the step: piecewise linear through ``points``.

    Each point is ``(step, {name: weight})``; a name a point leaves out weighs 0 there. Before the
    first point the first point's weights hold, after the last the last's. Without points the
    fixed ``weights`` hold.
    """

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[float],
        points: Sequence[tuple[int, Mapping[str, float]]] = (),
    ) -> None:
        self.names = list(names)
        self.fixed = [float(w) for w in weights]
        self.steps = [int(step) for step, _ in points]
        self.points = [[float(point.get(name, 0.0)) for name in self.names] for _, point in points]
        unknown = {name for _, point in points for name in point} - set(self.names)
        if unknown:
            raise ValueError(
                f"mixture weights name unknown datasets {sorted(unknown)} (datasets: {', '.join(self.names)})"
            )
        if self.steps != sorted(set(self.steps)):
            raise ValueError(f"mixture points must have increasing steps, got {self.steps}")

    def weights(self, step: int) -> list[float]:
        if not self.points:
            return list(self.fixed)
        after = bisect.bisect_right(self.steps, step)
        if after == 0:
            return list(self.points[0])
        if after == len(self.points):
            return list(self.points[-1])
        left, right = self.steps[after - 1], self.steps[after]
        share = (step - left) / (right - left)
        return [a + share * (b - a) for a, b in zip(self.points[after - 1], self.points[after], strict=True)]


def draw_dataset(weights: Sequence[float], seed: int, rank: int, draw: int) -> int:
    """Index of the dataset for draw number ``draw``: counter-based, so the RNG state is the count."""
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixture weights {list(weights)} sum to {total}: nothing to draw from")
    threshold = seeded_rng(seed, rank, draw, MIXTURE_STREAM).random() * total
    cumulative = 0.0
    for index, weight in enumerate(weights):
        cumulative += weight
        if threshold < cumulative:
            return index
    return max(i for i, w in enumerate(weights) if w > 0)  # threshold == total after rounding

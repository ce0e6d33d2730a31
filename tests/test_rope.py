"""The multi-axis RoPE reference: identity at the origin, relative positions, bands and layouts."""

import math

import pytest
import torch

from imontage.kernels.rope.reference import apply_rope, rope_angles

THETA = (10000.0, 500.0, 10000.0, 2000.0)


def random_positions(n: int, generator: torch.Generator, high: int = 64) -> torch.Tensor:
    return torch.randint(0, high, (n, 4), generator=generator, dtype=torch.int32)


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
@pytest.mark.parametrize("bands", [(0, 6, 5, 5), (4, 4, 4, 4), (8, 0, 0, 0), (2, 3, 0, 7)])
def test_rotation_at_origin_is_identity(pair_layout: str, bands: tuple[int, ...]) -> None:
    x = torch.randn(7, 3, 32, dtype=torch.float64)
    out = apply_rope(x, torch.zeros(7, 4, dtype=torch.int32), bands, THETA, pair_layout, torch.float64)
    assert torch.equal(out, x)


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_scores_depend_only_on_position_difference_per_axis(pair_layout: str) -> None:
    g = torch.Generator().manual_seed(0)
    bands = (3, 5, 4, 4)
    q, k = torch.randn(2, 1, 1, 40, generator=g, dtype=torch.float64)
    p_q, p_k = random_positions(1, g), random_positions(1, g)
    shift = random_positions(1, g, high=1000)  # a different shift on every axis

    def score(pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
        rq = apply_rope(q, pq, bands, THETA, pair_layout, torch.float64)
        rk = apply_rope(k, pk, bands, THETA, pair_layout, torch.float64)
        return (rq * rk).sum()

    base = score(p_q, p_k)
    torch.testing.assert_close(score(p_q + shift, p_k + shift), base, rtol=1e-10, atol=1e-10)
    # ... and it does depend on the difference: moving one token changes the score.
    assert not torch.allclose(score(p_q + shift, p_k), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pair_layout", ["half", "interleaved"])
def test_pairs_beyond_the_bands_are_copied_and_norms_kept(pair_layout: str) -> None:
    g = torch.Generator().manual_seed(1)
    bands = (0, 2, 3, 1)  # 6 of the 16 pairs of a 32-dim head rotate
    x = torch.randn(9, 2, 32, generator=g, dtype=torch.float64)
    out = apply_rope(x, random_positions(9, g), bands, THETA, pair_layout, torch.float64)
    if pair_layout == "half":
        rotated = torch.cat([torch.arange(6), 16 + torch.arange(6)])
    else:
        rotated = torch.arange(12)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[rotated] = False
    assert torch.equal(out[..., untouched], x[..., untouched])
    assert not torch.allclose(out[..., rotated], x[..., rotated])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_angles_follow_the_design_formula() -> None:
    """Pair j of axis a turns by p_a · theta_a^(−j / n_a), axes in the order s, t, h, w."""
    bands = (2, 3, 0, 4)
    positions = torch.tensor([[5, 7, 11, 13]], dtype=torch.int32)
    angles = rope_angles(positions, bands, THETA, torch.float64)[0]
    expected = []
    for axis, count in enumerate(bands):
        for j in range(count):
            expected.append(positions[0, axis].item() * THETA[axis] ** (-j / count))
    torch.testing.assert_close(angles, torch.tensor(expected, dtype=torch.float64))


def test_rotation_matches_complex_multiplication() -> None:
    """An independent formulation: pair (a, b) as a + ib, multiplied by e^{i·angle}."""
    g = torch.Generator().manual_seed(2)
    bands = (1, 2, 2, 3)
    x = torch.randn(5, 2, 16, generator=g, dtype=torch.float64)
    positions = random_positions(5, g)
    out = apply_rope(x, positions, bands, THETA, "interleaved", torch.float64)
    for n in range(5):
        pair = 0
        for axis, count in enumerate(bands):
            for j in range(count):
                angle = positions[n, axis].item() * THETA[axis] ** (-j / count)
                z = torch.complex(x[n, :, 2 * pair], x[n, :, 2 * pair + 1]) * complex(
                    math.cos(angle), math.sin(angle)
                )
                torch.testing.assert_close(out[n, :, 2 * pair], z.real)
                torch.testing.assert_close(out[n, :, 2 * pair + 1], z.imag)
                pair += 1


def test_half_and_interleaved_are_the_same_rotation_of_permuted_features() -> None:
    g = torch.Generator().manual_seed(3)
    bands = (2, 2, 2, 2)
    x = torch.randn(4, 3, 16, generator=g, dtype=torch.float64)
    positions = random_positions(4, g)
    # interleaved index 2i, 2i+1 <-> half index i, i + D/2
    to_half = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
    half = apply_rope(x[..., to_half], positions, bands, THETA, "half", torch.float64)
    inter = apply_rope(x, positions, bands, THETA, "interleaved", torch.float64)
    torch.testing.assert_close(half, inter[..., to_half])


def test_too_many_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        apply_rope(torch.zeros(1, 1, 8), torch.zeros(1, 4, dtype=torch.int32), (1, 1, 1, 2), THETA)

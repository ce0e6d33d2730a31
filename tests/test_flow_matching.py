"""Rectified-flow matching: the noising formula, the target, and a loss over target tokens only."""

import torch
from conftest import tiny_model_config

from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.objectives.flow_matching import (
    FlowMatching,
    masked_mse,
    noise_batch,
    sample_timesteps,
    select_tokens,
    shift_timesteps,
    text_keep_mask,
)


def two_samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    return [
        Sample([Segment("text", text="edit"), Segment("image", "condition", torch.randn(3, 1, 8, 8, generator=g)),
                Segment("image", "target", torch.randn(3, 1, 8, 8, generator=g))]),
        Sample([Segment("text", text="clip"), Segment("video", "target", torch.randn(3, 2, 8, 4, generator=g))]),
    ]  # fmt: skip


def packed():
    return pack_samples(two_samples(), packing_spec(tiny_model_config()))


def test_noising_follows_the_formula_on_targets_and_leaves_conditions_clean() -> None:
    batch = packed()
    t = torch.tensor([0.25, 0.8])
    noise = torch.randn(batch.tokens.shape)
    noised, velocity = noise_batch(batch, t, noise)
    t_tok = t[batch.sample_index()][:, None]
    target = batch.target_mask
    torch.testing.assert_close(noised.tokens[target], ((1 - t_tok) * batch.tokens + t_tok * noise)[target])
    assert torch.equal(noised.tokens[~target], batch.tokens[~target])
    torch.testing.assert_close(velocity, noise - batch.tokens)
    assert torch.equal(noised.timesteps[~target], torch.zeros(int((~target).sum())))
    assert torch.equal(noised.timesteps[target], t[batch.sample_index()][target])


def test_loss_counts_target_tokens_only() -> None:
    batch = packed()
    target = torch.randn(batch.tokens.shape)
    prediction = torch.randn(batch.tokens.shape)
    loss = masked_mse(prediction, target, batch.target_mask)
    prediction[~batch.target_mask] += 100.0
    assert torch.equal(masked_mse(prediction, target, batch.target_mask), loss)
    expected = (prediction - target)[batch.target_mask].square().mean()
    torch.testing.assert_close(loss, expected)


def test_timesteps_are_logit_normal_and_shifted() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 0.0, 1.0, 1.0, g)
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = shift_timesteps(t, 3.0)
    assert torch.all(shifted >= t) and shifted.median() > 0.7
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)


def test_dropping_text_removes_exactly_those_tokens() -> None:
    batch = packed()
    keep = text_keep_mask(batch, torch.tensor([True, False]))
    dropped = select_tokens(batch, keep)
    lengths = (dropped.cu_seqlens[1:] - dropped.cu_seqlens[:-1]).tolist()
    # sample 0: "edit" (4) dropped, 4 + 4 image tokens stay; sample 1: "clip" (4) + 2x2x1 video tokens
    assert (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist() == [12, 8]
    assert lengths == [8, 8]
    assert dropped.is_text.sum() == 4
    for span in dropped.spans:  # spans still address the right tokens
        original = next(s for s in batch.spans if (s.sample, s.index) == (span.sample, span.index))
        assert torch.equal(
            dropped.tokens[span.start : span.start + span.length],
            batch.tokens[original.start : original.start + original.length],
        )


def test_objective_is_deterministic_for_a_generator_state() -> None:
    from imontage.models.dit.model import DiT

    cfg = tiny_model_config()
    model = DiT(cfg)
    objective = FlowMatching(text_dropout=0.5)
    losses = [objective(model, packed(), torch.Generator().manual_seed(3)).loss for _ in range(2)]
    assert torch.equal(losses[0], losses[1])
    # A zero-output model predicts velocity 0: the loss is E[(ε − x0)²] over target tokens.
    assert 1.0 < losses[0].item() < 3.5

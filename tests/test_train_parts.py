"""The LR schedule and the EMA."""

import math

import pytest
import torch
from torch import nn

from imontage.train.ema import EMA
from imontage.train.schedule import learning_rate


def test_warmup_then_cosine_to_the_floor() -> None:
    lrs = [learning_rate(step, 100, 1.0, 10, "cosine", 0.1) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # monotone decay
    middle = 10 + (100 - 10 - 1) / 2
    assert learning_rate(int(middle), 100, 1.0, 10) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * (int(middle) - 10) / 89))
    )


def test_constant_schedule_and_no_warmup() -> None:
    assert [learning_rate(s, 50, 0.3, 0, "constant") for s in (0, 25, 49)] == [0.3, 0.3, 0.3]


def test_ema_follows_the_formula_and_restores_weights_exactly() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], 0.9 * start[name] + 0.1 * p.detach())
    live = {k: v.detach().clone() for k, v in model.named_parameters()}
    with ema.applied_to(model):
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ema.shadow[name])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), live[name])

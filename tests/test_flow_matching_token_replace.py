"""HunyuanVideo-I2V token_replace: a training step keeps each target video's first latent frame clean.

Its tokens reach the model equal to the clean latent at timestep 0 and count in no loss; the other
frames are noised; a one-frame target (an image) is noised whole.
"""

from __future__ import annotations

import torch
from conftest import REPO
from torch import nn

from imontage.config import load_recipe
from imontage.models import build_model, packing_spec
from imontage.models.common.sequence import PackedBatch, Sample, Segment, pack_samples
from imontage.objectives.flow_dpo import FlowDPO
from imontage.objectives.flow_matching import FlowMatching

C = 4  # hunyuan_video_tiny's latent channels


class Recorded(nn.Module):
    """The model, keeping the batch it was called with; ``bump`` is added to its output on ``rows``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, None
        self.bump: tuple[torch.Tensor, float] | None = None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        self.seen = batch
        out = self.model(batch)
        if self.bump is not None:
            rows, value = self.bump
            out = out + value * rows[:, None].to(out.dtype)
        return out


def token_replace_case() -> tuple[nn.Module, PackedBatch, torch.Tensor, torch.Tensor]:
    """(model, batch, first-frame rows, other target rows): a 3-frame video sample and a one-frame one."""
    overrides = ["model=hunyuan_video_tiny", "model.prediction=velocity", "model.positions.layout=video3d",
                 "model.hunyuan_video.image_condition_type=token_replace"]  # fmt: skip
    cfg = load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides)
    torch.manual_seed(0)
    model = Recorded(build_model(cfg.model))
    g = torch.Generator().manual_seed(1)
    pooled = cfg.model.hunyuan_video.pooled_projection_dim
    samples = [
        Sample([Segment("text", data=torch.randn(3, cfg.model.text_dim, generator=g)),
                Segment("latent", "target", torch.randn(C, frames, 4, 6, generator=g))],
               pooled_text=torch.randn(pooled, generator=g), guidance=1.0)
        for frames in (3, 1)
    ]  # fmt: skip
    batch = pack_samples(samples, packing_spec(cfg.model))
    video = next(span for span in batch.spans if span.shape[1:2] == (3,))
    first = torch.zeros_like(batch.target_mask)
    first[video.start : video.start + 2 * 3] = True  # frame 0: 2x3 patches of 4x6
    objective = FlowMatching.from_config(cfg.flow_matching, cfg.model)
    assert (
        objective.clean_first_frame
        and FlowDPO.from_config(cfg.dpo, cfg.flow_matching, cfg.model).clean_first_frame
    )
    return model, batch, first, batch.target_mask & ~first


def step(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, int]:
    out = FlowMatching(text_dropout=0.0, clean_first_frame=True)(
        model, batch, torch.Generator().manual_seed(2)
    )
    return out.loss, out.num_target_tokens


def test_token_replace_keeps_the_first_frame_clean_and_out_of_the_loss() -> None:
    model, batch, first, noised = token_replace_case()
    loss, counted = step(model, batch)
    seen = model.seen
    assert seen is not None
    assert torch.equal(seen.tokens[first], batch.tokens[first])  # the clean latent
    assert not seen.timesteps[first].any()
    assert torch.equal(
        seen.target_mask, batch.target_mask
    )  # still targets: the model modulates them at t = 0
    assert (seen.timesteps[noised] > 0).all() and (seen.tokens[noised] != batch.tokens[noised]).all()
    image = torch.zeros_like(first)
    image[-6:] = True  # the one-frame sample's 6 tokens: noised whole
    assert (image & noised).sum() == 6 and (seen.timesteps[image] > 0).all()
    assert counted == int(noised.sum()) == int(batch.target_mask.sum()) - 6
    model.bump = (first, 1e3)  # any error on the first frame leaves the loss as it was
    assert torch.equal(step(model, batch)[0], loss)
    model.bump = (noised, 1e3)  # the same error on the noised frames does not
    assert step(model, batch)[0] > loss


def test_without_token_replace_every_target_frame_is_noised() -> None:
    model, batch, first, _ = token_replace_case()
    FlowMatching(text_dropout=0.0)(model, batch, torch.Generator().manual_seed(2))
    assert model.seen is not None and (model.seen.timesteps[first] > 0).all()

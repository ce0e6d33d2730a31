"""Sampling the tiny random HunyuanVideo from latent shards with pooled text (conditioned_shards.py):
the loader's pooled text and distilled guidance reach the model, token_replace keeps each target's
first latent frame clean through every step, latent_concat's channel condition reaches both passes,
true CFG runs on a negative prompt's text and pooled text, and ``imontage-sample`` does all this on
a run, refusing an unconditional pass nobody chose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conditioned_shards import POOLED_DIM
from conftest import REPO
from latent_shards import LATENT_CHANNELS, TEXT_DIM
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from imontage.config import load_recipe
from imontage.data import preview_samples
from imontage.dataprep.encode import NEGATIVE
from imontage.models import build_model, packing_spec
from imontage.models.common.sequence import PackedBatch, PackingSpec
from imontage.sample.cli import main as sample_main
from imontage.sample.grid import GAP, SEPARATOR
from imontage.sample.sampler import Negative, sample_flow
from imontage.train.trainer import train

HV = ["model=hunyuan_video_tiny", "model.prediction=velocity", f"model.text_dim={TEXT_DIM}",
      f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}", "model.positions.layout=video3d"]  # fmt: skip
I2V = {
    "token_replace": ["model.hunyuan_video.image_condition_type=token_replace"],
    "latent_concat": ["model.hunyuan_video.image_condition_type=latent_concat", "model.hunyuan_video.guidance_embeds=false",
                      f"model.in_channels={2 * LATENT_CHANNELS + 1}"],
}  # fmt: skip


@pytest.fixture(scope="module")
def root(pooled_text_shards: Path) -> Path:
    """The session's two image-to-video samples with pooled text (conftest.py)."""
    return pooled_text_shards


class Recorded(nn.Module):
    """The model, keeping every batch it is called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        self.seen.append(batch)
        return self.model(batch)


def setup(
    root: Path, overrides: list[str], guidance: float | None = None
) -> tuple[Recorded, PackingSpec, list]:
    """(the tiny random HunyuanVideo, its spec, the shards' samples as the loader reads them)."""
    cfg = load_recipe(REPO / "configs/recipes/quickstart.yaml", [*HV, *overrides])
    torch.manual_seed(0)
    spec = packing_spec(cfg.model, guidance)
    data = OmegaConf.create({"shards": str(root / "latents/pixels-*.tar"), "text_embeddings": True})
    return Recorded(build_model(cfg.model).eval()), spec, preview_samples(data, 2, spec)


def run(model: nn.Module, samples: list, spec: PackingSpec, **kwargs: object) -> list:
    return sample_flow(model, samples, spec, steps=3, generator=torch.Generator().manual_seed(0), **kwargs)


def test_distilled_guidance_and_pooled_text_reach_the_model(root: Path) -> None:
    model, spec, samples = setup(root, [], guidance=4.0)
    assert [s.guidance for s in samples] == [4.0, 4.0] and all(
        s.pooled_text.shape == (POOLED_DIM,) for s in samples
    )
    out = run(model, samples, spec)
    assert [[None if x is None else tuple(x.shape) for x in row] for row in out] == [
        [None, (LATENT_CHANNELS, 1, 4, 6), (LATENT_CHANNELS, 2, 4, 6)]
    ] * 2
    assert all(torch.equal(b.guidance, torch.tensor([4.0, 4.0])) for b in model.seen)
    assert torch.equal(model.seen[0].pooled_text, torch.stack([s.pooled_text for s in samples]))
    _, spec_6, samples_6 = setup(root, [], guidance=6.0)
    assert not torch.allclose(out[0][2], run(model, samples_6, spec_6)[0][2])
    torch.testing.assert_close(out[0][2], run(model, samples, spec)[0][2], rtol=0, atol=0)  # same noise


def test_token_replace_keeps_the_first_latent_frame_clean_through_every_step(root: Path) -> None:
    model, spec, samples = setup(root, I2V["token_replace"])
    out = run(model, samples, spec, clean_first_frame=True)
    for sample, row in zip(samples, out, strict=True):
        given, made = sample.segments[2].data, row[2]  # the clip [4, 2, 4, 6]
        assert torch.equal(made[:, :1], given[:, :1])  # the condition latent, exactly
        assert not torch.allclose(made[:, 1:], given[:, 1:]) and bool(made.isfinite().all())
    batch = model.seen[0]
    first = torch.zeros_like(batch.target_mask)
    for span in batch.spans:
        if span.kind != "text" and span.shape[1] == 2:
            first[span.start : span.start + span.length // 2] = True
    assert len(model.seen) == 3
    for seen in model.seen:  # every step: clean tokens at t = 0, the other target rows noised
        assert torch.equal(seen.tokens[first], batch.tokens[first]) and not seen.timesteps[first].any()
        assert bool((seen.timesteps[batch.target_mask & ~first] > 0).all())
    model.seen.clear()
    plain = run(model, samples, spec)  # without it the first frame is generated like the rest
    assert not torch.equal(plain[0][2][:, :1], samples[0].segments[2].data[:, :1])


def test_true_cfg_runs_on_the_negative_prompt_with_the_latent_concat_condition(root: Path) -> None:
    model, spec, samples = setup(root, I2V["latent_concat"])
    negative = Negative.load(root / "latents" / NEGATIVE)
    assert negative.pooled_text is not None and negative.pooled_text.shape == (POOLED_DIM,)
    out = run(model, samples, spec, guidance=4.0, negative=negative)
    conditional, unconditional = model.seen[0], model.seen[1]
    assert conditional.channel_condition is not None and unconditional.channel_condition is not None
    visual, free_visual = ~conditional.is_text, ~unconditional.is_text
    assert torch.equal(unconditional.channel_condition[free_visual], conditional.channel_condition[visual])
    assert torch.equal(unconditional.pooled_text, negative.pooled_text.expand(2, -1))
    assert torch.equal(unconditional.text_embeds[unconditional.is_text], negative.text.repeat(2, 1))
    assert torch.equal(unconditional.tokens[free_visual], conditional.tokens[visual])
    # A negative equal to the sample's own text and pooled text makes guidance the identity.
    one = samples[:1]
    own = Negative(one[0].segments[0].data, one[0].pooled_text)
    torch.testing.assert_close(
        run(model, one, spec, guidance=4.0, negative=own)[0][2], run(model, one, spec)[0][2]
    )
    assert not torch.allclose(out[0][2], run(model, samples, spec)[0][2])
    dropped = run(model, samples, spec, guidance=4.0)  # text dropout: another unconditional pass
    assert not torch.allclose(out[0][2], dropped[0][2])


@pytest.fixture(scope="module")
def t2v_run(root: Path) -> Path:
    """One training step of the tiny guidance-distilled HunyuanVideo at embedded guidance 4."""
    overrides = [
        *HV, f"run_dir={root / 'run'}", f"data.shards={root / 'latents/pixels-*.tar'}", "data.text_embeddings=true",
        "flow_matching.embedded_guidance=4.0", "parallel=single", "train.precision=fp32", "data.num_workers=0",
        "data.batch_size=2", "stages.sft.steps=1", "train.progress=false", "train.sample.every=0",
    ]  # fmt: skip
    return train(load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides))


def test_imontage_sample_samples_a_hunyuan_video_run(
    root: Path, t2v_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def sample(name: str, *extra: str) -> tuple[int, Path]:
        out = tmp_path / f"{name}.png"
        argv = [str(t2v_run), "--data", str(root / "latents/pixels-*.tar"), "--num", "1", "--steps", "2",
                "--no-ema", "--vae", str(root / "models/vae"), "--out", str(out), *extra]  # fmt: skip
        return sample_main(argv), out

    code, default = sample("default")
    assert code == 0
    # A 32x48 condition image | the generated 5-frame clip | its ground truth, in pixels.
    with Image.open(default) as grid:
        assert grid.size == (GAP + 11 * (48 + GAP) + 2 * SEPARATOR, 32 + 2 * GAP)
    assert sample("four", "--embedded-guidance", "4")[1].read_bytes() == default.read_bytes()  # the run's
    assert sample("one", "--embedded-guidance", "1")[1].read_bytes() != default.read_bytes()
    capsys.readouterr()
    assert sample("unchosen", "--guidance", "3")[0] == 2
    assert "--negative" in capsys.readouterr().err
    code, guided = sample("guided", "--guidance", "3", "--negative", str(root / "latents" / NEGATIVE))
    assert code == 0 and guided.read_bytes() != default.read_bytes()


def test_training_previews_of_a_token_replace_run_keep_the_first_frame_clean(
    root: Path, tmp_path: Path
) -> None:
    """The trainer's preview grids sample as the run trains: token_replace's first frame stays clean."""
    from imontage.train.trainer import Trainer

    overrides = [*HV, *I2V["token_replace"], f"data.shards={root / 'latents/pixels-*.tar'}",
                 "data.text_embeddings=true", f"run_dir={tmp_path}", "train.sample.steps=2", "train.progress=false"]  # fmt: skip
    trainer = Trainer(load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides))
    samples = preview_samples(trainer.cfg.data, 2, trainer.spec)
    out = trainer.sample(samples, torch.Generator().manual_seed(0))
    for sample, row in zip(samples, out, strict=True):
        assert torch.equal(row[2][:, :1], sample.segments[2].data[:, :1])
        assert not torch.equal(row[2][:, 1:], sample.segments[2].data[:, 1:])

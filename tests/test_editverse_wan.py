"""EditVerse on Wan 2.1 (configs/recipes/editverse_wan2.1_1.3b.yaml) keeps Wan's pretrained RoPE:
under layout editverse4d the s axis has no rotary pairs, so the tiny Wan computes exactly what it
computes under video3d; a recipe that gives s pairs is refused naming the key, before anything runs.
tests/test_recipes_run.py runs the recipe itself."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from imontage.config import RecipeError, load_recipe
from imontage.config.schema import ModelConfig
from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.wan.diffusers_config import CLASS_NAME, diffusers_config
from imontage.models.wan.model import build_wan

RECIPE = REPO / "configs/recipes/editverse_wan2.1_1.3b.yaml"
TEXT_DIM = 16


def tiny_wan_config(**changes: object) -> OmegaConf:
    preset = OmegaConf.load(REPO / "configs/model/wan_tiny.yaml")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, {"text_dim": TEXT_DIM, **changes})


def edit_sample() -> Sample:
    """Text, a source image and a source clip (conditions), the edited clip (target): 2×4×4 latents."""
    generator = torch.Generator().manual_seed(0)
    latent = lambda frames: torch.randn(4, frames, 4, 4, generator=generator)  # noqa: E731
    return Sample([Segment("text", data=torch.randn(5, TEXT_DIM, generator=generator)),
                   Segment("image", "condition", latent(1)), Segment("video", "condition", latent(2)),
                   Segment("video", "target", latent(2))])  # fmt: skip


def wan_output(bands: list[int], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, output) of the same tiny Wan weights on the edit sample packed under ``layout``."""
    cfg = tiny_wan_config(rope={"bands": bands}, positions={"layout": layout})
    torch.manual_seed(0)
    model = build_wan(cfg).eval()
    batch = pack_samples([edit_sample()], packing_spec(cfg))
    timesteps = torch.where(batch.target_mask, 0.7, 0.0)  # the target noised, the sources clean
    with torch.no_grad():
        return batch.positions, model(batch.replace(timesteps=timesteps))


def test_editverse4d_with_the_pretrained_bands_computes_what_video3d_does() -> None:
    pretrained = [int(b) for b in tiny_wan_config().rope.bands]
    assert pretrained[0] == 0  # Wan's RoPE rotates t, h and w only
    positions_4d, out_4d = wan_output(pretrained, "editverse4d")
    positions_3d, out_3d = wan_output(pretrained, "video3d")
    assert positions_4d[:, 0].unique().numel() > 1 and not positions_3d[:, 0].any()  # s is computed...
    assert torch.equal(positions_4d[:, 1:], positions_3d[:, 1:])  # ...the other axes are video3d's
    assert torch.equal(out_4d, out_3d)  # ...and with no pairs for s, Wan sees the same rotations
    # The check can fail: with pairs for s, the segments' s offsets change what the model computes.
    _, out_s = wan_output([2, 2, 2, 2], "editverse4d")
    _, out_s_3d = wan_output([2, 2, 2, 2], "video3d")
    assert not torch.allclose(out_s, out_s_3d)


def write_config_folder(folder: Path) -> Path:
    """A diffusers Wan folder's config.json (the recipe check reads nothing else)."""
    folder.mkdir(parents=True)
    config = {"_class_name": CLASS_NAME, **diffusers_config(tiny_wan_config())}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_editverse4d_bands_for_s_are_refused_against_a_pretrained_folder(tmp_path: Path) -> None:
    folder = write_config_folder(tmp_path / "transformer")
    tiny = ["model=wan_tiny", f"model.text_dim={TEXT_DIM}", f"model.init_from_diffusers={folder}",
            "data.shards=x.tar", "parallel=single"]  # fmt: skip
    cfg = load_recipe(RECIPE, tiny)
    assert cfg.model.positions.layout == "editverse4d" and list(cfg.model.rope.bands) == [0, 4, 2, 2]
    with pytest.raises(RecipeError) as refused:
        load_recipe(RECIPE, [*tiny, "model.rope.bands=[2,2,2,2]"])
    message = str(refused.value)
    assert message.startswith("<command line>: key 'model.rope.bands': [2, 2, 2, 2] is not the [0, 4, 2, 2]")
    assert "the only one its class computes" in message and "EditVerse on Wan" in message
    with pytest.raises(RecipeError, match=r"<command line>: key 'model.rope.pair_layout': half is not"):
        load_recipe(RECIPE, [*tiny, "model.rope.pair_layout=half"])

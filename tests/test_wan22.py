"""Wan 2.2 as presets of the Wan family: T2V/I2V-A14B (two experts of one shape) and TI2V-5B.

The presets' parameter counts are checked on the meta device against diffusers' own
``WanTransformer3DModel`` built from the same config, and against the public sizes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from imontage.checkpoint.diffusers import build_diffusers_model
from imontage.config import load_recipe
from imontage.models import build_model, count_parameters
from imontage.models.wan.model import WanTransformer

# One expert of the A14B pair is the Wan 2.1 14B shape (I2V: 20 more input channels, no CLIP path);
# TI2V-5B is named for its size.
PUBLIC = {"wan2.2_t2v_a14b": 14.29e9, "wan2.2_i2v_a14b": 14.29e9, "wan2.2_ti2v_5b": 5.0e9}


def preset_config(preset: str, *overrides: str) -> object:
    return load_recipe(
        REPO / "configs/recipes/quickstart.yaml", [f"model={preset}", "model.prediction=velocity", *overrides]
    ).model


@pytest.mark.parametrize("preset", sorted(PUBLIC))
def test_preset_parameter_counts(preset: str) -> None:
    cfg = preset_config(preset)
    model = build_model(cfg, device="meta")
    assert isinstance(model, WanTransformer) and len(model.blocks) == cfg.depth  # type: ignore[attr-defined]
    with torch.device("meta"):
        reference = build_diffusers_model(cfg)
    count = count_parameters(model)
    assert count == count_parameters(reference), preset
    assert abs(count / PUBLIC[preset] - 1) <= 0.01, (preset, count)
    assert abs(count / cfg.stated_params - 1) <= 0.01, (preset, count)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.wan.boundary_ratio=1.0", "wan.boundary_ratio"),
        ("model.in_channels=96", "wan.expand_timesteps"),  # no room for condition channels
    ],
)
def test_preset_values_are_checked(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        preset_config("wan2.2_ti2v_5b", override)

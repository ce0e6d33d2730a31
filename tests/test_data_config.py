"""The recipe's data section: what validate() rejects, named by key and file; shipped data configs load."""

from __future__ import annotations

import pytest
from conftest import REPO

from imontage.config import RecipeError, load_recipe

BASE = REPO / "configs/recipes/quickstart.yaml"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.datasets=[{name: a, shards: x.tar}]"], r"key 'data\.shards': set either 'shards'"),
        (
            ["data.buckets.image=[[32,30]]"],
            r"key 'data\.buckets\.image': entry \[32, 30\]: sizes must be positive multiples of the patch size \[4, 4\]",
        ),
        (["data.buckets.frames=[0]"], r"key 'data\.buckets\.frames'"),
        (
            ["data.max_tokens=0", "data.batch_size=0"],
            r"key 'data\.max_tokens': set max_tokens, batch_size or both",
        ),
        (["data.video.sampling=random"], r"key 'data\.video\.sampling': 'random' is not one of stride, fps"),
        (["data.bad_data.skip_budget=1.5"], r"key 'data\.bad_data\.skip_budget': must be in \[0, 1\)"),
        (
            ["data.text_embeddings=true"],
            r"key 'data\.text_embeddings': needs model\.text_encoder=precomputed",
        ),
        (
            [
                "data.shards=''",
                "data.datasets=[{name: a, shards: x.tar}]",
                "data.mixture=[{step: 0, weights: {b: 1}}]",
            ],
            r"key 'data\.mixture\[0\]\.weights': unknown dataset\(s\) \['b'\]",
        ),
        (
            ["data.shards=''", "data.datasets=[{name: a, shards: x.tar}, {name: a, shards: y.tar}]"],
            r"key 'data\.datasets\[0\]\.name': names must be unique",
        ),
        (["stages.sft.data.max_tokens=-1"], r"key 'stages\[0\]\.data\.max_tokens': must be >= 0"),
    ],
    ids=[
        "shards-and-datasets",
        "bucket-patch",
        "frames",
        "no-batch",
        "sampling",
        "budget",
        "embeddings",
        "mixture-name",
        "dup-name",
        "stage",
    ],
)
def test_bad_data_sections_are_rejected_by_key(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(BASE, overrides)


def test_mixture_config_loads_with_its_schedule() -> None:
    cfg = load_recipe(BASE, ["data=synthetic_mixture"])
    assert [d.name for d in cfg.data.datasets] == ["edit", "montage", "video"] and not cfg.data.shards
    assert [point.step for point in cfg.data.mixture] == [0, 200, 400]

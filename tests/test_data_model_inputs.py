"""What a pretrained family reads besides tokens, from a sample's members (imontage.data.conditions).

A sample that lacks what its model needs (a pooled text vector, image tokens, a condition latent, a
condition image) is an ``unpackable`` skip whose message names the shard, the key and the member or
field, known from the index; a member that is missing, of another format or of the wrong shape has
the reason the other members have. Nothing is filled with zeros in its place. A model that reads
none of these fields gets none, whatever the sample holds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import save

from imontage.config import load_recipe
from imontage.config.loader import RecipeError
from imontage.data import build_loader
from imontage.data.decode import DecodeOptions, decode_item
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, ShardWriter
from imontage.models import packing_spec
from imontage.models.common.sequence import DEFAULT_EMBEDDED_GUIDANCE, PackingSpec

C, T, H, W = 4, 3, 4, 6  # latent channels and a target video's latent frames, height, width
BASE = PackingSpec(in_channels=C, patch_size=(1, 2, 2), max_text_len=16, layout="video3d")
HUNYUAN = dataclasses.replace(BASE, pooled_text_dim=8, guidance=5.0)
HUNYUAN_I2V = dataclasses.replace(BASE, pooled_text_dim=8, channel_condition="latent_concat")
WAN_I2V = dataclasses.replace(BASE, image_embed_dim=6, channel_condition="wan_i2v")
OPTIONS = DecodeOptions(text_embeddings=True)


def tensor_bytes(*shape: int, seed: int = 0) -> bytes:
    return save({"x": torch.randn(*shape, generator=torch.Generator().manual_seed(seed))})


def sample(key: str = "k", drop: tuple[str, ...] = (), **fields: object) -> RawSample:
    """An image-to-video latent sample with every member; ``fields`` change json fields (None: removed),
    ``drop`` removes members."""
    members = {
        "text.safetensors": tensor_bytes(5, 16),
        "pooled.safetensors": tensor_bytes(8, seed=1),
        "image.safetensors": tensor_bytes(3, 6, seed=2),
        "0.safetensors": tensor_bytes(C, 1, H, W, seed=3),
        "1.safetensors": tensor_bytes(C, T, H, W, seed=4),
        "1.condition.safetensors": tensor_bytes(C, T, H, W, seed=5),
    }
    segments = [
        {"role": "condition", "kind": "latent", "member": "0.safetensors"},
        {
            "role": "target",
            "kind": "latent",
            "member": "1.safetensors",
            "condition_latent": "1.condition.safetensors",
        },
    ]
    record: dict[str, object] = {"text": "a red circle", "text_embedding": "text.safetensors",
                                 "pooled_text": "pooled.safetensors", "image_embeds": "image.safetensors",
                                 "segments": segments}  # fmt: skip
    for name, value in fields.items():
        if value is None:
            record.pop(name)
        else:
            record[name] = value
    members = {name: data for name, data in members.items() if name not in drop}
    return RawSample(key, "shard-0.tar", {**members, "json": json.dumps(record).encode()}, 0, 0)


def rejected(raw: RawSample, spec: PackingSpec) -> DataError:
    with pytest.raises(DataError) as error:
        decode_item(raw, OPTIONS, spec)
    assert error.value.shard == "shard-0.tar" and error.value.key == "k"
    assert "shard shard-0.tar, sample 'k'" in str(error.value)
    return error.value


def test_each_family_gets_the_fields_it_reads_and_no_others() -> None:
    raw = sample()
    [hunyuan] = decode_item(raw, OPTIONS, HUNYUAN).samples
    assert hunyuan.pooled_text is not None and hunyuan.pooled_text.shape == (8,)
    assert hunyuan.guidance == 5.0 and hunyuan.image_embeds is None
    assert all(segment.channel_condition is None for segment in hunyuan.segments)
    [wan] = decode_item(raw, OPTIONS, WAN_I2V).samples
    assert wan.pooled_text is None and wan.guidance is None
    assert wan.image_embeds is not None and wan.image_embeds.shape == (3, 6)
    [plain] = decode_item(raw, OPTIONS, BASE).samples  # the dit: none, though the sample has them all
    assert (plain.pooled_text, plain.image_embeds, plain.guidance) == (None, None, None)
    assert all(segment.channel_condition is None for segment in plain.segments)


def test_a_missing_per_sample_field_is_an_unpackable_skip_naming_it() -> None:
    error = rejected(sample(pooled_text=None), HUNYUAN)
    assert (
        error.reason == "unpackable"
        and "'pooled_text'" in str(error)
        and "--pooled-text-encoder" in str(error)
    )
    error = rejected(sample(image_embeds=None), WAN_I2V)
    assert error.reason == "unpackable" and "'image_embeds'" in str(error) and "--image-encoder" in str(error)
    error = rejected(sample(), dataclasses.replace(HUNYUAN, pooled_text_dim=12))
    assert error.reason == "unpackable" and "'pooled_text' has width 8, the model takes 12" in str(error)


def test_a_named_member_is_checked_like_text_embedding() -> None:
    error = rejected(sample(drop=("pooled.safetensors",)), HUNYUAN)
    assert error.reason == "missing_member" and "pooled_text: member 'pooled.safetensors' is missing" in str(
        error
    )
    assert rejected(sample(image_embeds="image.png"), WAN_I2V).reason == "bad_json"
    assert rejected(sample(pooled_text="pooled.pt"), HUNYUAN).reason == "unsafe_member"
    raw = sample()
    raw.members["pooled.safetensors"] = tensor_bytes(2, 8)
    error = rejected(raw, HUNYUAN)
    assert error.reason == "undecodable" and "a pooled text vector is [E], got shape [2, 8]" in str(error)


def test_wan_i2v_targets_need_their_condition_latent() -> None:
    segments = json.loads(sample().members["json"])["segments"]
    del segments[1]["condition_latent"]
    error = rejected(sample(segments=segments), WAN_I2V)
    assert (
        error.reason == "unpackable" and "target segment 1" in str(error) and "--i2v-condition" in str(error)
    )
    raw = sample()
    raw.members["1.condition.safetensors"] = tensor_bytes(C, T - 1, H, W)
    error = rejected(raw, WAN_I2V)
    assert error.reason == "undecodable" and "does not lie over its segment" in str(error)
    segments = json.loads(sample().members["json"])["segments"]
    segments[0]["condition_latent"] = "1.condition.safetensors"  # on the condition: meaningless
    assert rejected(sample(segments=segments), WAN_I2V).reason == "bad_json"


def test_latent_concat_needs_a_condition_image_of_the_targets_size() -> None:
    segments = json.loads(sample().members["json"])["segments"]
    error = rejected(sample(segments=segments[1:]), HUNYUAN_I2V)
    assert error.reason == "unpackable" and "no condition segment" in str(error)
    raw = sample()
    raw.members["0.safetensors"] = tensor_bytes(C, 1, H, W + 2)
    error = rejected(raw, HUNYUAN_I2V)
    assert error.reason == "unpackable" and "must be one latent frame of the target's 4x6" in str(error)


def test_under_montage_no_target_is_given_a_first_frame() -> None:
    """iMontage's targets are pseudo-frames at the tail of the virtual clip: zeros, mask 0."""
    raw = sample()
    [video3d] = decode_item(raw, OPTIONS, HUNYUAN_I2V).samples
    [montage] = decode_item(raw, OPTIONS, dataclasses.replace(HUNYUAN_I2V, layout="montage")).samples
    given, none = video3d.segments[-1].channel_condition, montage.segments[-1].channel_condition
    assert given is not None and none is not None and given.shape == none.shape == (C + 1, T, H, W)
    assert given[C, 0].eq(1).all() and not given[C, 1:].any() and not given[:C, 1:].any()
    assert not none.any()
    [wan] = decode_item(raw, OPTIONS, dataclasses.replace(WAN_I2V, layout="montage")).samples
    assert wan.segments[-1].channel_condition is not None and not wan.segments[-1].channel_condition.any()


def test_the_loader_counts_the_skip_or_raises_in_strict_mode(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    with ShardWriter(path) as writer:
        for index in range(4):
            raw = sample(f"{index:06d}", **({"pooled_text": None} if index == 0 else {}))
            writer.add_sample(raw.key, raw.members)
    data = {"shards": str(path), "text_embeddings": True, "batch_size": 3, "shuffle_buffer": 0}
    loader = build_loader({**data, "batch_size": 2, "bad_data": {"skip_budget": 0.25}}, HUNYUAN)
    keys = []
    for _ in range(loader.batches_in_epoch(0)):
        batch = next(loader)
        assert loader.last is not None and batch.pooled_text is not None
        assert batch.pooled_text.shape == (batch.num_samples, 8)
        keys += [key for _, key in loader.last.keys]
    assert "000000" not in keys and len(keys) >= 2
    assert loader.stats().skipped == {"unpackable": {str(path): 1}}  # counted, as other skips are
    [problem] = list(loader.catalog.problems())  # known from the index, before decoding
    assert problem.reason == "unpackable" and problem.key == "000000" and "'pooled_text'" in str(problem)
    loader.close()
    with pytest.raises(DataError, match=r"sample '000000': unpackable: .*'pooled_text'"):
        build_loader({**data, "bad_data": {"strict": True}}, HUNYUAN)


def test_the_recipe_refuses_a_guidance_scale_the_model_cannot_take() -> None:
    quickstart = REPO / "configs/recipes/quickstart.yaml"
    with pytest.raises(RecipeError, match="key 'flow_matching.embedded_guidance'.*has no guidance embedding"):
        load_recipe(quickstart, ["flow_matching.embedded_guidance=6"])
    hunyuan = ["model=hunyuan_video_tiny", "model.prediction=velocity"]
    with pytest.raises(RecipeError, match="key 'flow_matching.embedded_guidance'.*has no guidance embedding"):
        load_recipe(
            quickstart,
            [*hunyuan, "model.hunyuan_video.guidance_embeds=false", "flow_matching.embedded_guidance=6"],
        )
    cfg = load_recipe(quickstart, hunyuan)
    assert packing_spec(cfg.model).guidance == DEFAULT_EMBEDDED_GUIDANCE == 1.0
    assert packing_spec(cfg.model, 6.0).guidance == 6.0
    latent_concat = [*hunyuan, "model.hunyuan_video.image_condition_type=latent_concat"]
    with pytest.raises(
        RecipeError,
        match=r"key 'model.in_channels'.*takes 9 channels \(4 latent \+ 4 image latent \+ 1 mask\)",
    ):
        load_recipe(quickstart, latent_concat)
    spec = packing_spec(load_recipe(quickstart, [*latent_concat, "model.in_channels=9"]).model)
    assert (spec.in_channels, spec.channel_condition, spec.pooled_text_dim) == (4, "latent_concat", 12)

"""NaN and Inf in array members: their own skip reason, ``non_finite``, and never in a batch.

A latent or text embedding holding NaN or Inf (as the float32 training reads, so a float64 value
beyond float32's range counts) is skipped and counted in skip mode, raised naming the shard, the
key, the member and the tensor in strict mode, reported by ``inspect_shards --validate`` (every
array member, read by the model or not); a training run over a shard mixing them with good samples
trains on the good ones with finite losses and reports the count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_data_claims import lie_in_index
from test_data_tools import inspect_shards

from imontage.config import load_recipe
from imontage.data import build_loader
from imontage.data.decode import DecodeOptions, decode_item
from imontage.data.index import scan_shard, write_index
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, ShardWriter
from imontage.dataprep.testing import array_bytes, latent_sample, non_finite_samples
from imontage.models.common.sequence import PackingSpec
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

SPEC = PackingSpec(in_channels=4, patch_size=(1, 2, 2), max_text_len=32, layout="video3d", text_embed_dim=16)
OPTIONS = DecodeOptions(text_embeddings=True)
# Members a latent model with precomputed text reads, and the member and tensor each lies in.
READ = {
    "nan-latent": "member '1.safetensors': tensor 'x' of shape [4, 1, 4, 4] holds 1 NaN or infinite values",
    "inf-latent-npy": "member '0.npy': the array of shape [4, 1, 4, 4] holds 1 NaN or infinite values",
    "nan-text": "member 'text.safetensors': tensor 'x' of shape [5, 16] holds 1 NaN or infinite values",
    "inf-text-float16": "member 'text.safetensors': tensor 'x'",
    "overflow-text": "member 'text.safetensors': tensor 'x'",
}
# Members only some models read: the pooled text (HunyuanVideo), condition latents (Wan I2V).
READ_BY = {
    "nan-pooled": dataclasses.replace(SPEC, pooled_text_dim=8),
    "nan-condition": dataclasses.replace(SPEC, channel_condition="wan_i2v"),
}


def test_the_cases_cover_every_sample() -> None:
    assert set(READ) | set(READ_BY) == set(non_finite_samples())


@pytest.mark.parametrize("key", sorted(non_finite_samples()))
def test_a_non_finite_member_is_its_own_reason_naming_shard_key_member_and_tensor(key: str) -> None:
    raw = RawSample(key, "s.tar", non_finite_samples()[key], 0, 0)
    with pytest.raises(DataError) as caught:
        decode_item(raw, OPTIONS, READ_BY.get(key, SPEC))
    assert (caught.value.reason, caught.value.shard, caught.value.key) == ("non_finite", "s.tar", key)
    assert str(caught.value).startswith(f"shard s.tar, sample '{key}': non_finite: member '")
    if key in READ:
        assert READ[key] in str(caught.value)
    else:  # a model that does not read the member trains on the sample: nothing of it reaches the model
        [sample] = decode_item(raw, OPTIONS, SPEC).samples
        assert all(segment.data is None or segment.data.isfinite().all() for segment in sample.segments)


def write_mixed(path: Path, bad: list[str]) -> str:
    """Good latent samples good0.. with one of ``bad`` after each, in stored order."""
    samples = non_finite_samples()
    with ShardWriter(path) as writer:
        for index in range(len(bad) + 3):
            writer.add_sample(f"good{index}", latent_sample(index))
            if index < len(bad):
                writer.add_sample(bad[index], samples[bad[index]])
    return str(path)


def data(shards: str, **changes: object) -> dict:
    return {"shards": shards, "text_embeddings": True, "batch_size": 2, "shuffle_buffer": 0, **changes}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_mixed(tmp_path_factory.mktemp("nonfinite") / "mixed-000000.tar", sorted(READ))


def test_skip_mode_counts_them_and_batches_hold_only_finite_good_samples(mixed: str) -> None:
    loader = build_loader(data(mixed, bad_data={"skip_budget": 0.5}), SPEC)
    keys = []
    for _ in range(loader.batches_in_epoch(0)):
        batch = next(loader)
        assert loader.last is not None and batch.text_embeds is not None
        assert bool(batch.tokens.isfinite().all()) and bool(batch.text_embeds.isfinite().all())
        keys += [key for _, key in loader.last.keys]
    assert keys == [f"good{i}" for i in range(len(keys))] and len(keys) >= 4
    assert loader.stats().skipped == {"non_finite": {mixed: len(READ)}}
    assert "skipped non_finite: 5" in "\n".join(loader.summary_lines())


def test_strict_mode_names_the_first_when_decoding_it(mixed: str) -> None:
    loader = build_loader(data(mixed, bad_data={"strict": True}), SPEC)  # nothing known before decoding
    with pytest.raises(DataError, match=r"sample 'inf-latent-npy': non_finite: member '0\.npy': the array"):
        for _ in range(loader.batches_in_epoch(0)):
            next(loader)


def test_inspect_shards_validate_reports_every_array_member(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = write_mixed(tmp_path / "all.tar", sorted(non_finite_samples()))
    report = tmp_path / "report.json"
    assert inspect_shards.main([shard, "--validate", "--no-progress", "--json", str(report)]) == 1
    assert "problems: 7" in capsys.readouterr().out
    problems = json.loads(report.read_text())["problems"][shard]
    assert sorted((key, reason) for key, reason, _ in problems) == sorted(
        (key, "non_finite") for key in non_finite_samples()
    )
    assert inspect_shards.main([shard, "--no-progress"]) == 0  # headers alone cannot tell


def test_training_over_a_mixed_shard_trains_on_the_good_samples(tmp_path: Path) -> None:
    """A latent DiT on a shard where NaN/Inf latents and text embeddings, a text embedding of
    another width and a sample its index understates sit between good samples: every loss is
    finite, no step is thrown away, and the run's data summary counts each skip."""
    shard = tmp_path / "train-000000.tar"
    samples = non_finite_samples()
    bad = {
        **{key: samples[key] for key in READ},
        "wide": latent_sample(40, {"text.safetensors": array_bytes(np.ones((5, 12), np.float32))}),
        "longer": latent_sample(41, {"1.safetensors": array_bytes(np.ones((4, 2, 4, 4), np.float32))}),
    }
    with ShardWriter(shard) as writer:
        for index, (key, members) in enumerate(bad.items()):
            writer.add_sample(f"good{index}", latent_sample(index))
            writer.add_sample(key, members)
        writer.add_sample("good7", latent_sample(7))
    write_index(scan_shard(str(shard)))
    lie_in_index(str(shard), "longer", frames=1)
    overrides = [
        "model.in_channels=4", "model.patch_size=[1,2,2]", "model.text_encoder=precomputed",
        "model.text_dim=16", "model.hidden_size=32", "model.num_heads=2", "model.depth=1",
        "model.mlp_hidden_size=64", "model.rope.bands=[0,3,3,2]", "model.positions.layout=video3d",
        f"data.shards={shard}", "data.text_embeddings=true", "data.batch_size=2", "data.max_tokens=0",
        "data.shuffle_buffer=0", "data.bad_data.skip_budget=0.5", "stages.sft.steps=4",
        "flow_matching.text_dropout=0", "train.ema_decay=0", "train.sample.every=0",
        "train.checkpoint.every=0", "train.progress=false", f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run_dir = train(load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides))
    records = read_metrics(run_dir)
    assert len(records) == 4 and all(math.isfinite(record["loss"]) for record in records)
    assert records[-1]["skipped_steps"] == 0
    stats = json.loads((run_dir / "data_summary.json").read_text())["sft"]["stats"]
    assert stats["skipped"] == {"non_finite": {str(shard): len(READ)}, "unpackable": {str(shard): 2}}
    assert stats["samples_emitted"] == 8

"""The plain shard reader: shard lists, decoding, deterministic batches and exact resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imontage.config.schema import DataConfig
from imontage.data import build_loader, decode_sample, expand_shards, reader
from imontage.data.reader import ShardLoader, epoch_samples, read_shard
from imontage.data.synthetic import write_shards, write_tar
from imontage.models.dit.sequence import PackedBatch, PackingSpec

SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=64, layout="montage")
NUM_SAMPLES = 24  # 4 shards of 7, 7, 7, 3 samples
BATCH_SIZE = 5  # does not divide 24: batches straddle epochs


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, samples=NUM_SAMPLES, per_shard=7, seed=0, progress=False)
    return out


def loader(shard_dir: Path, seed: int = 0, shuffle_buffer: int = 8) -> ShardLoader:
    cfg = DataConfig(
        shards=str(shard_dir / "train-*.tar"), batch_size=BATCH_SIZE, shuffle_buffer=shuffle_buffer, seed=seed
    )
    return build_loader(cfg, SPEC)


def take(batches: ShardLoader, count: int) -> list[PackedBatch]:
    return [next(batches) for _ in range(count)]


def assert_same_batches(got: list[PackedBatch], expected: list[PackedBatch]) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        for name in ("tokens", "positions", "cu_seqlens", "text_ids", "target_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"batch {index}: {name} differs"


def raw_samples(shard_dir: Path) -> dict[str, dict]:
    """Every raw (undecoded) sample of the data set, by key."""
    return {raw["__key__"]: raw for path in sorted(shard_dir.glob("*.tar")) for raw in read_shard(str(path))}


# ---------------------------------------------------------------------------------------------
# shard lists


def test_expand_shards_globs_ranges_and_lists(shard_dir: Path) -> None:
    names = [str(shard_dir / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(shard_dir / "train-*.tar")) == names
    assert expand_shards(str(shard_dir / "train-{000001..000002}.tar")) == names[1:3]
    assert expand_shards(names[2]) == [names[2]]
    listed = f"{shard_dir}/train-{{000003..000003}}.tar, {shard_dir}/train-*.tar,{names[0]}"
    assert expand_shards(listed) == [names[3], names[0], names[1], names[2]]


@pytest.mark.parametrize(
    "item",
    ["nothing-*.tar", "train-{000002..000009}.tar", "train-000123.tar"],
    ids=["glob", "range-with-holes", "path"],
)
def test_expand_shards_names_the_item_that_matches_nothing(shard_dir: Path, item: str) -> None:
    spec = f"{shard_dir}/train-*.tar,{shard_dir}/{item}"
    with pytest.raises(FileNotFoundError, match=item.replace("{", r"\{").replace("*", r"\*")):
        expand_shards(spec)


# ---------------------------------------------------------------------------------------------
# decoding


def test_decode_edit_montage_and_video(shard_dir: Path) -> None:
    raws = raw_samples(shard_dir)
    assert len(raws) == NUM_SAMPLES
    edit = decode_sample(raws["000000"], "000000", "shard.tar")
    assert edit.task == "edit" and edit.key == "000000"
    assert [(s.kind, s.role) for s in edit.segments] == [
        ("text", "condition"),
        ("image", "condition"),
        ("image", "target"),
    ]
    assert edit.segments[0].text == json.loads(raws["000000"]["json"])["text"]
    assert [tuple(s.data.shape) for s in edit.segments[1:]] == [(3, 1, 32, 32)] * 2  # type: ignore[union-attr]

    montage = decode_sample(raws["000001"], "000001", "shard.tar")
    assert montage.task == "montage"
    assert {tuple(s.data.shape) for s in montage.segments[1:]} == {(3, 1, 32, 48)}  # type: ignore[union-attr]

    video = decode_sample(raws["000002"], "000002", "shard.tar")
    assert [(s.kind, s.role) for s in video.segments] == [
        ("text", "condition"),
        ("image", "condition"),
        ("video", "target"),
    ]
    condition, target = video.segments[1].data, video.segments[2].data
    assert condition is not None and target is not None
    assert tuple(condition.shape) == (3, 1, 24, 32) and tuple(target.shape) == (3, 4, 24, 32)
    assert condition.dtype == torch.float32 and -1.0 <= float(target.min()) <= float(target.max()) <= 1.0
    # Frame 2 of the video is member 3.png, as x/127.5 - 1 of its RGB pixels.
    pixels = np.asarray(Image.open(io.BytesIO(raws["000002"]["3.png"])).convert("RGB"))  # [H, W, 3]
    expected = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(target[:, 2], expected)


def with_record(raw: dict, **changes: object) -> dict:
    record = {**json.loads(raw["json"]), **changes}
    return {**raw, "json": json.dumps(record).encode()}


def test_decode_passes_anchor_through_and_skips_empty_text(shard_dir: Path) -> None:
    raw = raw_samples(shard_dir)["000000"]
    segments = json.loads(raw["json"])["segments"]
    segments[0]["anchor"] = 2
    sample = decode_sample(with_record(raw, text="", segments=segments), "000000", "s.tar")
    assert [s.kind for s in sample.segments] == ["image", "image"]
    assert [s.anchor for s in sample.segments] == [2, None]


def test_decode_errors_name_shard_key_and_member(shard_dir: Path) -> None:
    raw = raw_samples(shard_dir)["000002"]
    missing = {name: data for name, data in raw.items() if name != "3.png"}
    with pytest.raises(ValueError, match=r"shard data/x-000007\.tar.*'000002'.*'3\.png'"):
        decode_sample(missing, "000002", "data/x-000007.tar")
    with pytest.raises(ValueError, match=r"shard a\.tar.*'000002'.*'0\.png'.*cannot decode"):
        decode_sample({**raw, "0.png": b"not a png"}, "000002", "a.tar")
    with pytest.raises(ValueError, match=r"shard a\.tar.*'000002'.*'json'"):
        decode_sample({**raw, "json": b'{"task": '}, "000002", "a.tar")
    latent = [{"role": "target", "kind": "latent", "member": "0.npy"}]
    with pytest.raises(ValueError, match=r"'000002'.*segment kind 'latent'"):
        decode_sample(with_record(raw, segments=latent), "000002", "a.tar")


# ---------------------------------------------------------------------------------------------
# order and batches


def epoch_keys(shard_dir: Path, seed: int, epoch: int, buffer: int) -> list[str]:
    shards = expand_shards(str(shard_dir / "train-*.tar"))
    return [raw["__key__"] for raw in epoch_samples(shards, seed, epoch, buffer)]


def test_every_epoch_is_a_seeded_permutation(shard_dir: Path) -> None:
    all_keys = [f"{i:06d}" for i in range(NUM_SAMPLES)]
    assert epoch_keys(shard_dir, seed=0, epoch=0, buffer=0) == all_keys
    shuffled = epoch_keys(shard_dir, seed=0, epoch=0, buffer=8)
    assert sorted(shuffled) == all_keys and shuffled != all_keys
    assert epoch_keys(shard_dir, seed=0, epoch=0, buffer=8) == shuffled
    assert epoch_keys(shard_dir, seed=0, epoch=1, buffer=8) != shuffled
    assert epoch_keys(shard_dir, seed=1, epoch=0, buffer=8) != shuffled


def test_batches_are_full_and_seeded(shard_dir: Path) -> None:
    first = take(loader(shard_dir, seed=0), 7)  # 35 samples: past the end of the first epoch
    assert [batch.num_samples for batch in first] == [BATCH_SIZE] * 7
    assert_same_batches(take(loader(shard_dir, seed=0), 7), first)
    other = take(loader(shard_dir, seed=1), 7)
    assert not torch.equal(other[0].tokens, first[0].tokens)


def test_loader_without_shuffling_reads_in_stored_order(shard_dir: Path) -> None:
    raws = raw_samples(shard_dir)
    batch = next(loader(shard_dir, shuffle_buffer=0))
    expected = reader.pack_samples([decode_sample(raws[f"{i:06d}"], f"{i:06d}", "") for i in range(5)], SPEC)
    assert_same_batches([batch], [expected])


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("consumed", [1, 4, 5, 9])
def test_resume_continues_batch_for_batch(shard_dir: Path, consumed: int) -> None:
    following = 6  # with `consumed`, spans at least two epochs of 24 samples
    uninterrupted = take(loader(shard_dir), consumed + following)

    interrupted = loader(shard_dir)
    take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["samples_seen"] == consumed * BATCH_SIZE
    assert (state["epoch"], state["offset"]) == divmod(consumed * BATCH_SIZE, NUM_SAMPLES)

    resumed = loader(shard_dir)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, following), uninterrupted[consumed:])
    assert resumed.samples_seen == (consumed + following) * BATCH_SIZE


def test_state_moves_to_the_next_epoch_with_its_last_sample(shard_dir: Path) -> None:
    cfg = DataConfig(shards=str(shard_dir / "*.tar"), batch_size=NUM_SAMPLES // 3, shuffle_buffer=8)
    batches = build_loader(cfg, SPEC)
    take(batches, 3)
    assert (batches.epoch, batches.offset, batches.samples_seen) == (1, 0, NUM_SAMPLES)


def test_load_state_rewinds_a_loader_in_use(shard_dir: Path) -> None:
    batches = loader(shard_dir)
    take(batches, 2)
    state = batches.state_dict()
    expected = take(batches, 3)
    batches.load_state_dict(state)
    assert_same_batches(take(batches, 3), expected)


def test_resume_decodes_only_the_samples_it_yields(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = loader(shard_dir).state_dict() | {"epoch": 3, "offset": 17, "samples_seen": 89}
    decoded = []
    decode = reader.decode_sample
    monkeypatch.setattr(
        reader, "decode_sample", lambda raw, key, url: decoded.append(key) or decode(raw, key, url)
    )
    resumed = loader(shard_dir)
    resumed.load_state_dict(state)
    next(resumed)
    assert len(decoded) == BATCH_SIZE
    assert decoded[:5] == epoch_keys(shard_dir, seed=0, epoch=3, buffer=8)[17:22]


def test_resume_rejects_a_state_of_other_data(shard_dir: Path) -> None:
    state = loader(shard_dir, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed 0"):
        loader(shard_dir, seed=1).load_state_dict(state)


def test_empty_shards_raise_instead_of_looping(tmp_path: Path) -> None:
    write_tar(tmp_path / "empty-000000.tar", [])
    cfg = DataConfig(shards=str(tmp_path / "empty-*.tar"), batch_size=2)
    with pytest.raises(ValueError, match="no samples"):
        next(build_loader(cfg, SPEC))

"""The streaming loader: samples split by rank and worker, equal batches per rank, exact resume with workers."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from imontage.config.schema import BucketConfig, DataConfig
from imontage.data import build_loader, stream
from imontage.data.catalog import Catalog, PackingLimits
from imontage.data.decode import DecodedItem, DecodeOptions, decode_item
from imontage.data.loader import StreamLoader
from imontage.data.plan import Sharding, allowed_skips, guaranteed_batches, plan_epoch
from imontage.data.shards import RawSample, expand_shards
from imontage.dataprep.testing import MIXED_BUCKETS, write_mixed_shards
from imontage.models.common.sequence import PackedBatch, PackingSpec

SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="video3d")
SHARD_SIZES = [3, 17, 8, 25, 11]  # 64 samples in 5 shards of unequal size


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("mixed")
    write_mixed_shards(out, SHARD_SIZES, seed=1)
    return str(out / "mixed-*.tar")


def config(shards: str, **changes: object) -> DataConfig:
    values: dict = {
        "shards": shards,
        "max_tokens": 1024,  # the largest sample has 879 tokens
        "batch_size": 0,
        "pack_buffer": 8,
        "shuffle_buffer": 8,
        "num_workers": 2,
        "seed": 3,
        "buckets": BucketConfig(**MIXED_BUCKETS),  # type: ignore[arg-type]
    }
    return DataConfig(**{**values, **changes})  # type: ignore[arg-type]


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a stuck worker or rank would otherwise block the test run."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def take(loader: StreamLoader, count: int) -> list[tuple[list[tuple[str, str]], PackedBatch]]:
    out = []
    for _ in range(count):
        batch = next(loader)
        assert loader.last is not None
        out.append((loader.last.keys, batch))
    return out


def assert_same(got: list, expected: list) -> None:
    assert [keys for keys, _ in got] == [keys for keys, _ in expected]
    for index, ((_, a), (_, b)) in enumerate(zip(got, expected, strict=True)):
        for name in ("tokens", "positions", "cu_seqlens", "text_ids", "target_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"batch {index}: {name} differs"


# ---------------------------------------------------------------------------------------------
# splitting


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 2), (3, 1), (4, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_slices_share_an_epoch_out_evenly(
    shards: str, world_size: int, num_workers: int, shuffle: bool
) -> None:
    limits = PackingLimits(max_tokens=1024, max_samples=0)
    options = DecodeOptions.from_config(config(shards))
    catalog = Catalog.build(expand_shards(shards), options, SPEC, limits)
    sharding = Sharding(seed=0, stream=0, shuffle=shuffle, world_size=world_size, num_workers=num_workers)
    for epoch in range(3):
        plan = plan_epoch(catalog, sharding, limits, skip_budget=0.05, epoch=epoch)
        read = [(p.shard, i) for pieces in plan.slices for p in pieces for i in range(p.start, p.stop)]
        assert len(read) == len(set(read)) == plan.slice_length * world_size * num_workers  # disjoint, equal
        assert plan.slice_length == sum(SHARD_SIZES) // (world_size * num_workers)
        skips = allowed_skips(0.05, plan.slice_length)
        assert all(
            guaranteed_batches(catalog, s, limits, skips) >= plan.batches_per_worker for s in plan.slices
        )
    assert len({plan_epoch(catalog, sharding, limits, 0.05, e).shard_order for e in range(4)}) == (
        4 if shuffle else 1
    )


def test_two_ranks_of_two_workers_yield_equal_batches_and_no_repeats(shards: str) -> None:
    """Acceptance: 2 ranks x 2 workers over 5 shards of unequal size, one epoch."""
    cfg = config(shards)
    loaders = [build_loader(cfg, SPEC, rank=rank, world_size=2) for rank in range(2)]
    assert isinstance(loaders[0], StreamLoader) and isinstance(loaders[1], StreamLoader)
    counts = [loader.batches_in_epoch(0) for loader in loaders]
    assert counts[0] == counts[1] > 0
    seen: list[tuple[str, str]] = []
    with time_limit(120):
        for loader in loaders:
            epochs = []
            for _ in range(counts[0]):
                next(loader)
                assert loader.last is not None
                seen.extend(loader.last.keys)
                epochs.append(loader.last.epoch)
            assert epochs == [0] * counts[0]  # exactly the epoch's count of batches...
            next(loader)
            assert loader.last is not None and loader.last.epoch == 1  # ...then the next epoch
            loader.close()
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    stats = [loader.stats() for loader in loaders]
    dropped = sum(s.samples_dropped for s in stats)
    print(
        f"\n2 ranks x 2 workers: {counts[0]} batches each, {len(seen)} of {sum(SHARD_SIZES)} samples, {dropped} dropped at epoch ends"
    )
    assert len(seen) >= 0.75 * sum(SHARD_SIZES)


def test_order_is_a_function_of_seed_epoch_and_rank(shards: str) -> None:
    def keys(**changes: object) -> list:
        loader = build_loader(config(shards, num_workers=0, **changes), SPEC, rank=1, world_size=2)
        assert isinstance(loader, StreamLoader)
        return [keys for keys, _ in take(loader, 6)]

    first = keys()
    assert keys() == first
    assert keys(seed=4) != first
    in_order = keys(shuffle_buffer=0)  # rank 1 of 2 reads the second half of the shards as stored
    assert in_order != first and all(
        key >= f"{sum(SHARD_SIZES) // 2:06d}" for batch in in_order for _, key in batch
    )


# ---------------------------------------------------------------------------------------------
# resume


def stopped_and_resumed(
    cfg: DataConfig, spec: PackingSpec, consumed: int, take: Callable[[StreamLoader, int], list]
) -> tuple[list, list]:
    """(what ``take`` reads of an uninterrupted loader over the first epoch and two batches into the
    second, what it reads of a loader stopped after ``consumed`` batches and restored from a JSON
    round trip of its state, from there on): the second equals the first's tail when resume is exact."""
    reference = build_loader(cfg, spec)
    assert isinstance(reference, StreamLoader)
    following = reference.batches_in_epoch(0) + 2 - consumed  # into the second epoch
    uninterrupted = take(reference, consumed + following)
    reference.close()
    interrupted = build_loader(cfg, spec)
    assert isinstance(interrupted, StreamLoader)
    take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.state_dict()))
    interrupted.close()
    resumed = build_loader(cfg, spec)
    assert isinstance(resumed, StreamLoader)
    resumed.load_state_dict(state)
    after = take(resumed, following)
    resumed.close()
    return uninterrupted, after


@pytest.mark.parametrize("consumed", [1, 4, 11])
def test_resume_with_two_workers_continues_batch_for_batch(shards: str, consumed: int) -> None:
    """Acceptance: stop after k batches with 2 workers, restore from a JSON round trip, next m batches equal."""
    with time_limit(120):
        uninterrupted, after = stopped_and_resumed(config(shards), SPEC, consumed, take)
        assert_same(after, uninterrupted[consumed:])


def test_resume_in_process_restores_buffers_mid_shard(shards: str) -> None:
    cfg = config(shards, num_workers=0, shuffle_buffer=16, pack_buffer=12)
    uninterrupted = take(build_loader(cfg, SPEC), 14)  # type: ignore[arg-type]
    interrupted = build_loader(cfg, SPEC)
    assert isinstance(interrupted, StreamLoader)
    take(interrupted, 5)
    state = json.loads(json.dumps(interrupted.state_dict()))
    [worker] = state["workers"]
    assert worker["shuffle"] and worker["packing"] and worker["cursor"] > 0  # buffers really were partly full
    resumed = build_loader(cfg, SPEC)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 9), uninterrupted[5:])  # type: ignore[arg-type]
    assert resumed.stats().samples_read >= interrupted.stats().samples_read


def test_only_the_samples_of_batches_made_are_decoded(shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing goes by the catalog's token counts: each sample is decoded once, when its batch is
    made; those still buffered when an epoch's count is met are dropped undecoded, and a restore
    decodes none of the samples it puts back into the buffers."""
    decoded: list[tuple[str, str]] = []

    def counted(raw: RawSample, *args: object, **kwargs: object) -> DecodedItem:
        decoded.append((raw.url, raw.key))
        return decode_item(raw, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stream, "decode_item", counted)
    cfg = config(shards, num_workers=0, shuffle_buffer=16, pack_buffer=12)
    loader = build_loader(cfg, SPEC)
    assert isinstance(loader, StreamLoader)
    batches = loader.batches_in_epoch(0) + 1  # into the second epoch: the first one's leftovers are counted
    emitted = [key for keys, _ in take(loader, batches) for key in keys]
    assert decoded == emitted
    assert loader.stats().samples_dropped > 0  # there were buffered samples left over

    interrupted = build_loader(cfg, SPEC)
    assert isinstance(interrupted, StreamLoader)
    take(interrupted, 5)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["workers"][0]["packing"]
    resumed = build_loader(cfg, SPEC)
    resumed.load_state_dict(state)
    decoded.clear()
    emitted = [key for keys, _ in take(resumed, 4) for key in keys]
    assert decoded == emitted


def test_resume_rejects_a_state_of_another_setup(shards: str) -> None:
    loader = build_loader(config(shards, num_workers=0), SPEC)
    next(loader)
    state = loader.state_dict()
    other = build_loader(config(shards, num_workers=0, seed=9), SPEC)
    with pytest.raises(ValueError, match="saved by another data setup: seed 3 -> 9"):
        other.load_state_dict(state)
    ranked = build_loader(config(shards, num_workers=0), SPEC, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank 0 -> 1; world_size 1 -> 2"):
        ranked.load_state_dict(state)


def test_trainer_resume_with_two_workers_is_bit_exact(tmp_path: Path, shards: str) -> None:
    """The same acceptance through the trainer's checkpoint (state.json): 6 steps == 3 + stop + resume + 3."""
    from conftest import REPO

    from imontage.config import load_recipe
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import train

    overrides = [
        "model.hidden_size=32", "model.num_heads=2", "model.depth=1", "model.mlp_hidden_size=64",
        "model.text_dim=16", "model.rope.bands=[0,3,3,2]", "model.positions.layout=video3d",
        f"data.shards={shards}", "data.max_tokens=1024", "data.batch_size=0", "data.num_workers=2",
        "data.pack_buffer=8", "data.shuffle_buffer=8", f"data.buckets.image={MIXED_BUCKETS['image']}",
        f"data.buckets.video={MIXED_BUCKETS['video']}", f"data.buckets.frames={MIXED_BUCKETS['frames']}",
        "train.progress=false", "train.sample.every=0", "train.ema_decay=0", "stages.sft.steps=6",
    ]  # fmt: skip
    recipe = REPO / "configs/recipes/quickstart.yaml"
    with time_limit(240):
        straight = train(load_recipe(recipe, [*overrides, f"run_dir={tmp_path / 'straight'}"]))
        resumed = tmp_path / "resumed"
        train(load_recipe(recipe, [*overrides, f"run_dir={resumed}", "train.stop_at_step=3"]))
        train(load_recipe(recipe, [*overrides, f"run_dir={resumed}"]))
    losses = [(r["step"], r["loss"]) for r in read_metrics(straight)]
    assert len(losses) == 6 and losses == [(r["step"], r["loss"]) for r in read_metrics(resumed)]
    summary = json.loads((resumed / "data_summary.json").read_text())
    assert summary["sft"]["step"] == 6 and summary["sft"]["stats"]["batches"] == 6

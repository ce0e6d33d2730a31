"""Bad data: each planted case is skipped and counted once, strict mode names it, the skip budget aborts."""

from __future__ import annotations

from pathlib import Path

import pytest

from imontage.config.schema import BadDataConfig, DataConfig
from imontage.data import build_loader
from imontage.data.loader import StreamLoader
from imontage.data.problems import DataError, SkipBudgetExceeded
from imontage.data.shards import ShardWriter
from imontage.dataprep.testing import BAD_LIMITS, bad_samples, write_bad_shards
from imontage.models.common.sequence import PackingSpec

SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="video3d")
GOOD = 8  # a0 a3 b0 b4 c0 c3 d0 d1
SAMPLE_PROBLEMS = 8  # every planted problem but the two shard-level ones
INDEXED = GOOD + SAMPLE_PROBLEMS  # d2, cut off by the truncation, is not a sample


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    out = tmp_path_factory.mktemp("bad")
    planted = write_bad_shards(out)
    return str(out / "bad-*.tar"), planted


def config(shards: str, **bad: object) -> DataConfig:
    # One sample per batch, stored order: the epoch's batches are the good samples, read to the last.
    limits = {**BAD_LIMITS, "skip_budget": SAMPLE_PROBLEMS / INDEXED, **bad}
    return DataConfig(shards=shards, batch_size=1, shuffle_buffer=0, bad_data=BadDataConfig(**limits))  # type: ignore[arg-type]


def test_skip_mode_counts_each_planted_case_once(bad_set: tuple[str, dict[str, int]]) -> None:
    shards, planted = bad_set
    loader = build_loader(config(shards), SPEC)
    assert isinstance(loader, StreamLoader)
    assert loader.batches_in_epoch(0) == GOOD
    keys = [key for _ in range(GOOD) for _, key in (next(loader), loader.last)[1].keys]  # type: ignore[union-attr]
    assert keys == ["a0", "a3", "b0", "b4", "c0", "c3", "d0", "d1"]
    stats = loader.stats()
    print("\nskipped by reason:", stats.skipped_by_reason())
    assert stats.skipped_by_reason() == planted
    assert (
        stats.samples_read == INDEXED
        and stats.samples_emitted == GOOD
        and stats.samples_skipped == SAMPLE_PROBLEMS
    )
    shard_of = {reason: next(iter(shards_)) for reason, shards_ in stats.skipped.items()}
    assert shard_of["not_a_tar"].endswith("bad-000004.tar") and shard_of["truncated_tar"].endswith(
        "bad-000003.tar"
    )
    assert shard_of["too_many_frames"].endswith("bad-000002.tar")
    summary = "\n".join(loader.summary_lines())
    assert "skipped undecodable: 2" in summary and "bad-000001.tar" in summary


def test_counts_survive_a_resume(bad_set: tuple[str, dict[str, int]]) -> None:
    shards, planted = bad_set
    first = build_loader(config(shards), SPEC)
    for _ in range(3):
        next(first)
    resumed = build_loader(config(shards), SPEC)
    resumed.load_state_dict(first.state_dict())
    for _ in range(GOOD - 3):
        next(resumed)
    assert resumed.stats().skipped_by_reason() == planted


def test_strict_mode_names_the_first_bad_shard_and_key(bad_set: tuple[str, dict[str, int]]) -> None:
    shards, _ = bad_set
    with pytest.raises(
        DataError, match=r"shard \S+/bad-000000\.tar, sample 'a1': bad_json: member 'json' is not UTF-8 json"
    ) as caught:
        build_loader(config(shards, strict=True), SPEC)
    assert (caught.value.reason, caught.value.key) == ("bad_json", "a1")


def test_strict_mode_raises_through_a_worker_process(tmp_path: Path) -> None:
    """A problem only decoding finds (a PNG whose pixel data is broken) reaches the main process by name."""
    samples = bad_samples()
    with ShardWriter(tmp_path / "late-000000.tar") as writer:
        writer.add_sample("good", samples["too_many_pixels"])  # fine without the cap
        writer.add_sample("broken", samples["undecodable_image"])
    cfg = DataConfig(shards=str(tmp_path / "late-*.tar"), batch_size=1, shuffle_buffer=0, num_workers=1)
    cfg.bad_data.strict = True
    loader = build_loader(cfg, SPEC)  # nothing wrong is known before decoding
    next(loader)
    with pytest.raises(
        DataError, match=r"late-000000\.tar, sample 'broken': undecodable: member '0\.png': cannot decode"
    ):
        next(loader)
    loader.close()


def test_a_sample_that_fails_to_decode_leaves_its_batch_to_the_others(tmp_path: Path) -> None:
    """Packing chooses from token counts, so a broken sample is found when its batch is made: it is
    skipped and the packer chooses again from what it holds; a resume after that batch goes on alike."""
    samples = bad_samples()
    good = samples["too_many_pixels"]  # an 80x80 PNG, fine without the cap: 400 + 10 text tokens
    with ShardWriter(tmp_path / "late-000000.tar") as writer:
        for key in ("g0", "g1", "broken", "g2", "g3", "g4", "g5"):  # broken: 64 + 8 tokens
            writer.add_sample(key, samples["undecodable_image"] if key == "broken" else good)
    cfg = DataConfig(
        shards=str(tmp_path / "late-*.tar"), max_tokens=900, batch_size=0, pack_buffer=3, shuffle_buffer=0
    )
    cfg.bad_data.skip_budget = 0.2  # one of the seven may fail
    loader = build_loader(cfg, SPEC)  # nothing wrong is known before decoding
    assert isinstance(loader, StreamLoader) and loader.batches_in_epoch(0) == 2
    keys = [[key for _, key in (next(loader), loader.last)[1].keys] for _ in range(2)]  # type: ignore[union-attr]
    # [g0 g1 broken] is chosen first and broken fails; [g0 g1] is made once g2 fills the buffer again
    assert keys == [["g0", "g1"], ["g2", "g3"]]
    assert loader.stats().skipped_by_reason() == {"undecodable": 1}

    first = build_loader(cfg, SPEC)
    next(first)
    resumed = build_loader(cfg, SPEC)
    resumed.load_state_dict(first.state_dict())
    next(resumed)
    assert resumed.last is not None and [key for _, key in resumed.last.keys] == ["g2", "g3"]
    assert resumed.stats().skipped_by_reason() == {"undecodable": 1}


def test_exceeding_the_skip_budget_stops_the_run(bad_set: tuple[str, dict[str, int]]) -> None:
    shards, _ = bad_set
    loader = build_loader(config(shards, skip_budget=(SAMPLE_PROBLEMS - 1) / INDEXED), SPEC)
    with pytest.raises(
        SkipBudgetExceeded,
        match=r"rank 0 worker 0, epoch 0: 8 of the 16 samples of its share skipped, over data.bad_data.skip_budget=0\.4375 \(at most 7\)",
    ):
        for _ in range(GOOD):
            next(loader)


def test_a_failing_pipe_command_is_a_read_error() -> None:
    cfg = DataConfig(shards="pipe:cat /nonexistent/shard.tar", batch_size=1)
    with pytest.raises(ValueError, match="0 samples cannot be shared by 1 ranks x 1 workers"):
        build_loader(cfg, SPEC)
    cfg.bad_data.strict = True
    with pytest.raises(DataError, match=r"read_error: 'cat /nonexistent/shard.tar' exited with status 1"):
        build_loader(cfg, SPEC)

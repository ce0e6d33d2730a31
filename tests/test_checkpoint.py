"""Checkpoint store: exact round trips, atomic saves, verification, resume fallback, pruning, no pickle."""

import copy
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imontage.checkpoint import store as ckpt
from imontage.checkpoint.store import (
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    checkpoint_name,
    find_resume_checkpoint,
    generator_state_to_tensor,
    is_complete,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    read_files,
    restore_generator_state,
    restore_rng_state,
    rng_state_to_tensors,
    save_checkpoint,
    verify_checkpoint,
)


def tensor_groups(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Several dtypes, 0-dim and empty tensors, a non-contiguous view and two views of one storage."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    return {
        "model": {
            "weight": base,
            "weight_rows": base[:2],  # shares storage with "weight"
            "weight_t": base.t(),  # non-contiguous
            "bf16": torch.randn(5, generator=g).bfloat16(),
            "fp16": torch.randn(2, 3, generator=g).half(),
            "scale": torch.tensor(seed + 0.25, dtype=torch.float64),  # 0-dim
            "count": torch.tensor(seed, dtype=torch.int64),  # 0-dim
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.arange(7, dtype=torch.uint8),
            "empty": torch.empty(0, 3),
        },
        "ema": {"weight": torch.randn(3, generator=g)},
    }


def save(root: Path, step: int, keep_last: int = 0) -> Path:
    return save_checkpoint(root, step, tensor_groups(step), {"step": step}, keep_last=keep_last)


def assert_groups_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for group, tensors in expected.items():
        assert actual[group].keys() == tensors.keys(), group
        for key, tensor in tensors.items():
            loaded = actual[group][key]
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, (group, key)
            assert torch.equal(loaded, tensor), (group, key)


def latest_name(root: Path) -> str:
    return (root / "latest").read_text().strip()


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- names


def test_checkpoint_name_is_zero_padded_and_widens() -> None:
    assert checkpoint_name(0) == "step_000000"
    assert checkpoint_name(500) == "step_000500"
    assert checkpoint_name(1_234_567) == "step_1234567"
    with pytest.raises(ValueError):
        checkpoint_name(-1)


# ------------------------------------------------------------------------------------- save and load


def test_save_load_round_trips_tensors_and_state_exactly(tmp_path: Path) -> None:
    state = {
        "step": 7,
        "stage": "sft",
        "loss": 0.1,
        "lr": 1e-08,
        "loader": {"epoch": 2, "order": [3, 1]},
        "ema": None,
    }
    path = save_checkpoint(tmp_path, 7, tensor_groups(7), state)
    assert path == tmp_path / "step_000007"
    tensors, loaded_state = load_checkpoint(path)
    assert_groups_equal(tensors, tensor_groups(7))
    assert loaded_state == state


def test_manifest_lists_every_file_with_its_sha256_and_size(tmp_path: Path) -> None:
    path = save(tmp_path, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["step"] == 3
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk == {"model.safetensors", "ema.safetensors", "state.json"}
    for name, record in manifest["files"].items():
        data = (path / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name


def test_checkpoint_holds_only_safetensors_and_json_and_loads_without_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(tmp_path, 1)
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, refuse)
    tensors, state = load_checkpoint(path)
    assert_groups_equal(tensors, tensor_groups(1))
    assert state == {"step": 1}


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 10)
    path = save_checkpoint(tmp_path, 10, tensor_groups(99), {"step": 10, "again": True})
    tensors, state = load_checkpoint(path)
    assert_groups_equal(tensors, tensor_groups(99))
    assert state == {"step": 10, "again": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000010"]


def test_non_json_state_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, tensor_groups(1), {"bad": object()})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- latest


def test_latest_names_the_newest_checkpoint(tmp_path: Path) -> None:
    save(tmp_path, 10)
    assert latest_name(tmp_path) == "step_000010"
    save(tmp_path, 20)
    assert latest_name(tmp_path) == "step_000020"
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"


def test_nothing_to_resume_from(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "missing") is None
    assert find_resume_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    "latest", [None, "step_000050\n", "../step_000010\n"], ids=["missing", "dangling", "path"]
)
def test_unusable_latest_falls_back_to_the_newest_with_a_warning(tmp_path: Path, latest: str | None) -> None:
    save(tmp_path, 10)
    save(tmp_path, 20)
    (tmp_path / "latest").unlink()
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    with pytest.warns(CheckpointWarning, match=re.escape(str(tmp_path / "latest")) + "|step_000050"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"


def test_latest_is_trusted_over_a_newer_checkpoint(tmp_path: Path) -> None:
    """A crash between the rename and the `latest` update: resume continues from what `latest` names."""
    save(tmp_path, 10)
    (tmp_path / "latest").write_text("step_000010\n")
    save(tmp_path, 20)
    (tmp_path / "latest").write_text("step_000010\n")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000010"


# ------------------------------------------------------------------------------- incomplete and corrupt


def test_directory_without_manifest_is_never_chosen(tmp_path: Path) -> None:
    save(tmp_path, 10)
    save(tmp_path, 20)
    incomplete = tmp_path / "step_000030"
    shutil.copytree(tmp_path / "step_000020", incomplete)
    (incomplete / MANIFEST).unlink()
    assert not is_complete(incomplete)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"

    (tmp_path / "latest").write_text("step_000030\n")
    with pytest.warns(CheckpointWarning, match=re.escape(str(incomplete / MANIFEST))):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"
    with pytest.raises(CheckpointError, match=re.escape(str(incomplete / MANIFEST))):
        load_checkpoint(incomplete)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (flip_byte, "sha256"),
        (lambda path: path.write_bytes(path.read_bytes()[:-1]), "bytes"),
        (Path.unlink, "missing"),
    ],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_damaged_newest_is_skipped_for_the_previous(tmp_path: Path, damage, reason: str) -> None:
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    damaged = newest / "model.safetensors"
    damage(damaged)
    with pytest.raises(CheckpointError, match=re.escape(str(damaged)) + ".*" + reason):
        verify_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match=re.escape(str(damaged))):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000010"
    with pytest.raises(CheckpointError, match=re.escape(str(damaged))):
        load_checkpoint(newest)


def test_flipped_byte_inside_tensor_data_is_caught(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    damaged = path / "ema.safetensors"
    flip_byte(damaged, offset=len(damaged.read_bytes()) // 2)
    message = re.escape(str(damaged)) + ": sha256 differs from " + re.escape(str(path / MANIFEST))
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):  # load checks the bytes it parses
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        read_files(path, ["state.json", "ema.safetensors"])
    assert read_files(path, ["state.json"]) == {"state.json": {"step": 1}}  # other files still read


def save_ranks(root: Path, step: int, world_size: int = 2) -> Path:
    """A checkpoint written as the multi-rank backend writes it: a file per rank in one staging dir."""
    staging = ckpt.make_staging(root, checkpoint_name(step), token=4242)
    for rank in range(world_size):
        ckpt.write_tensors(staging / f"rank_{rank:05d}.safetensors", tensor_groups(step + rank)["model"])
        ckpt.write_json(staging / f"rank_{rank:05d}.json", {"rank": rank})
    ckpt.write_json(staging / ckpt.STATE_FILE, {"step": step, "world_size": world_size})
    return ckpt.publish(root, staging, step)


def test_a_flipped_byte_in_one_rank_shard_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    save_ranks(tmp_path, 10)
    newest = save_ranks(tmp_path, 20)
    assert set(json.loads((newest / MANIFEST).read_text())["files"]) == {
        "rank_00000.safetensors",
        "rank_00001.safetensors",
        "rank_00000.json",
        "rank_00001.json",
        "state.json",
    }
    damaged = newest / "rank_00001.safetensors"
    flip_byte(damaged, offset=len(damaged.read_bytes()) // 2)
    with pytest.raises(CheckpointError, match=re.escape(str(damaged)) + ": sha256 differs"):
        read_files(newest, ["state.json", "rank_00001.json", damaged.name])
    read_files(newest, ["state.json", "rank_00000.json", "rank_00000.safetensors"])  # rank 0's files are fine
    with pytest.warns(
        CheckpointWarning, match=r"resuming from .*step_000010; skipped: " + re.escape(str(damaged))
    ):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000010"


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    (path / "extra.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(str(path / "extra.json")) + ": not listed in"):
        read_files(path, ["extra.json"])


def test_a_damaged_manifest_falls_back_with_a_warning_naming_it(tmp_path: Path) -> None:
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    flip_byte(newest / MANIFEST, offset=0)
    with pytest.warns(CheckpointWarning, match=re.escape(str(newest / MANIFEST)) + ": unreadable"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000010"
    with pytest.raises(CheckpointError, match=re.escape(str(newest / MANIFEST))):
        load_checkpoint(newest)


def test_renamed_checkpoint_fails_verification(tmp_path: Path) -> None:
    renamed = tmp_path / "step_000011"
    save(tmp_path, 10).rename(renamed)
    with pytest.raises(CheckpointError, match=re.escape(str(renamed / MANIFEST)) + ".*step 10"):
        verify_checkpoint(renamed)


def test_all_damaged_resumes_from_nothing_with_a_warning(tmp_path: Path) -> None:
    flip_byte(save(tmp_path, 10) / "state.json", offset=0)
    with pytest.warns(CheckpointWarning, match="nothing to resume from"):
        assert find_resume_checkpoint(tmp_path) is None


# --------------------------------------------------------------------------------------------- pruning


def test_keep_last_keeps_the_newest_complete_and_leaves_incomplete_alone(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    for step in (5, 99):  # incomplete: one older, one newer than every complete checkpoint
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / "model.safetensors").write_bytes(b"partial")
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_000005",
        "step_000030",
        "step_000040",
        "step_000099",
    ]
    assert latest_name(tmp_path) == "step_000040"
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000040"


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    save(tmp_path, 10, keep_last=1)
    save(tmp_path, 20, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000020"]
    # An older step written after a fallback resume: it is newest by time and survives.
    save(tmp_path, 15, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000015", "step_000020"]
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000015"


# ---------------------------------------------------------------------------------------------- crashes


def fail_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise OSError("simulated crash while writing the manifest")

    monkeypatch.setattr(ckpt, "_write_manifest", crash)


def fail_rename_into_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first rename onto a step_* name fails (a later one, restoring a displaced dir, succeeds)."""
    real_replace = os.replace
    failed: list[Path] = []

    def replace(src: Path, dst: Path) -> None:
        if not failed and Path(dst).name.startswith("step_"):
            failed.append(Path(dst))
            raise OSError("simulated crash while renaming into place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("crash", [fail_manifest, fail_rename_into_place])
@pytest.mark.parametrize("step", [30, 20], ids=["new-step", "same-step"])
def test_crash_mid_save_leaves_the_previous_checkpoint_in_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash, step: int
) -> None:
    save(tmp_path, 10)
    save(tmp_path, 20)
    crash(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, step, tensor_groups(99), {"step": step})
    monkeypatch.undo()

    assert latest_name(tmp_path) == "step_000020"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000010", "step_000020"]
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"
    assert_groups_equal(load_checkpoint(tmp_path / "step_000020")[0], tensor_groups(20))


def test_killed_save_leaves_debris_that_resume_ignores_and_the_next_save_removes(tmp_path: Path) -> None:
    save(tmp_path, 20)
    # Killed after the manifest but before the rename: a complete-looking staging directory.
    debris = tmp_path / ".tmp-step_000030-4242"
    shutil.copytree(tmp_path / "step_000020", debris)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"

    (tmp_path / "latest").write_text(f"{debris.name}\n")
    with pytest.warns(CheckpointWarning, match="not a checkpoint name"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000020"

    save(tmp_path, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000020", "step_000030"]


# ---------------------------------------------------------------------------------- optimiser and RNG


def adamw_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor) -> None:
    for x in inputs:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_optimizer_round_trip_continues_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    inputs = torch.randn(6, 5, 4)
    adamw_steps(model, optimizer, inputs[:3])

    optimizer_tensors, optimizer_meta = optimizer_state_to_tensors(optimizer.state_dict())
    path = save_checkpoint(
        tmp_path,
        3,
        {"model": model.state_dict(), "optimizer": optimizer_tensors},
        {"optimizer": optimizer_meta},
    )
    tensors, state = load_checkpoint(path)

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    twin.load_state_dict(tensors["model"])
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1.0)  # hyper-parameters come from the checkpoint
    restored = optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"])
    twin_optimizer.load_state_dict(restored)

    step = twin_optimizer.state_dict()["state"][0]["step"]
    assert isinstance(step, torch.Tensor) and step.dim() == 0 and step.dtype == torch.float32
    assert twin_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert twin_optimizer.param_groups[0]["lr"] == 1e-2

    adamw_steps(model, optimizer, inputs[3:])
    adamw_steps(twin, twin_optimizer, inputs[3:])
    for (name, expected), actual in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(actual, expected), name


def test_optimizer_state_keeps_types_of_ids_numbers_and_tuples() -> None:
    state_dict = {
        "state": {0: {"step": torch.tensor(3.0), "momentum_buffer": torch.ones(2)}, 5: {"step": 4.0, "n": 2}},
        "param_groups": [{"lr": torch.tensor(0.5), "betas": (0.9, 0.99), "foreach": None, "params": [0, 5]}],
    }
    tensors, meta = optimizer_state_to_tensors(state_dict)
    assert set(tensors) == {"state/0/step", "state/0/momentum_buffer", "param_groups/0/lr"}
    restored = optimizer_state_from_tensors(tensors, json.loads(json.dumps(meta)))
    assert list(restored["state"]) == [0, 5]
    assert restored["state"][5] == {"step": 4.0, "n": 2} and isinstance(restored["state"][5]["n"], int)
    assert torch.equal(restored["state"][0]["step"], torch.tensor(3.0))
    assert restored["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(restored["param_groups"][0]["lr"], torch.tensor(0.5))


def draw_all(generator: torch.Generator) -> tuple:
    return (
        torch.rand(5),
        torch.randn(3, generator=generator),
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(4),
        np.random.randn(3),
    )


def test_rng_round_trip_reproduces_every_stream(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(11)
    random.gauss(0.0, 1.0)  # leaves a cached gaussian in Python's state
    np.random.randn(1)  # and in numpy's
    rng_tensors, rng_meta = rng_state_to_tensors()
    rng_tensors["sampler"] = generator_state_to_tensor(generator)
    path = save_checkpoint(tmp_path, 1, {"rng": rng_tensors}, {"rng": rng_meta})

    first = draw_all(generator)
    tensors, state = load_checkpoint(path)
    restore_rng_state(tensors["rng"], state["rng"])
    restore_generator_state(generator, tensors["rng"]["sampler"])
    second = draw_all(generator)

    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2:4] == second[2:4]
    np.testing.assert_array_equal(first[4], second[4])
    np.testing.assert_array_equal(first[5], second[5])

"""What headers and index files claim is checked before it costs anything, and names what is wrong.

A member's header may claim any shape, a tar header any size, an index file anything at all. A
claim the bytes do not hold is a skip (or a shard problem) naming the shard, the key and the
member, found in bounded time and memory; an index whose facts are not the sample's own makes the
sample ``unpackable``, naming the member; a text embedding of another width than the model's is
``unpackable`` before anything is decoded; and an index file that is not one stops the loader with
an InputError and the tools with one line naming it (exit status 2).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_model_config
from test_data_tools import inspect_shards

from imontage.data import build_loader
from imontage.data.decode import DecodeOptions, decode_item, inspect_sample, plan_item
from imontage.data.index import read_sidecar, scan_shard, write_index
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, ShardWriter, tar_member_info
from imontage.dataprep.testing import (
    HUGE,
    array_bytes,
    image_bytes,
    latent_sample,
    latent_segments,
    png_claiming,
    record,
    size_claim_samples,
    tar_member_claiming,
)
from imontage.models import packing_spec
from imontage.models.common.sequence import PackingSpec
from imontage.untrusted import InputError

SPEC = PackingSpec(in_channels=4, patch_size=(1, 2, 2), max_text_len=32, layout="video3d", text_embed_dim=16)
GOOD = 4  # good latent samples in each shard written here
# The member each size claim lies in, as its message names it.
CLAIMED_MEMBER = {
    "npy-latent": "1.npy", "npy-negative-shape": "1.npy", "safetensors-latent": "1.safetensors",
    "safetensors-header-length": "1.safetensors", "safetensors-offsets": "1.safetensors",
    "safetensors-deep-header": "1.safetensors", "text-rows": "text.npy", "pooled-text": "pooled.npy",
    "image-embeds": "image.npy", "condition-latent": "c.safetensors",
}  # fmt: skip


def write_shard(path: Path, samples: dict[str, dict[str, bytes]], tail: bytes = b"") -> str:
    """``samples``, then GOOD good latent samples (keys good0..); the shard's path. ``tail``: bytes
    in place of the end-of-archive marker."""
    with ShardWriter(path) as writer:
        for key, members in samples.items():
            writer.add_sample(key, members)
        for index in range(GOOD):
            writer.add_sample(f"good{index}", latent_sample(index))
        end = writer.size
    if tail:
        path.write_bytes(path.read_bytes()[:end] + tail)
    return str(path)


def data(shards: str, **changes: object) -> dict:
    return {"shards": shards, "text_embeddings": True, "batch_size": 2, "shuffle_buffer": 0, **changes}


def epoch_keys(loader) -> list[str]:  # noqa: ANN001 - a StreamLoader
    keys = []
    for _ in range(loader.batches_in_epoch(0)):
        batch = next(loader)
        assert bool(batch.tokens.isfinite().all()) and batch.text_embeds is not None
        keys += [key for _, key in loader.last.keys]
    return keys


# ---------------------------------------------------------------------------------------------
# size claims


def test_the_claims_cover_every_array_field_and_format() -> None:
    assert set(CLAIMED_MEMBER) == set(size_claim_samples())


@pytest.mark.parametrize("key", sorted(CLAIMED_MEMBER))
def test_a_size_claim_is_undecodable_from_its_header_naming_the_member(key: str) -> None:
    raw = RawSample(key, "claims.tar", size_claim_samples()[key], 0, 0)
    started = time.perf_counter()
    with pytest.raises(DataError) as caught:
        inspect_sample(raw)
    assert time.perf_counter() - started < 1.0
    assert (caught.value.reason, caught.value.key) == ("undecodable", key)
    assert str(caught.value).startswith(
        f"shard claims.tar, sample '{key}': undecodable: member '{CLAIMED_MEMBER[key]}': "
    )
    assert "\n" not in str(caught.value)


def test_a_float_array_of_other_dtypes_or_no_values_is_undecodable() -> None:
    for name, members in {
        "int-latent": {"1.safetensors": array_bytes(np.zeros((4, 1, 4, 4), np.int32))},
        "complex-latent": {"1.npy": array_bytes(np.zeros((4, 1, 4, 4), np.complex64), "npy")},
        "empty-text": {"text.safetensors": array_bytes(np.zeros((0, 16), np.float32))},
    }.items():
        segments = latent_segments(target="1.npy") if "1.npy" in members else latent_segments()
        raw = RawSample(name, "s.tar", latent_sample(0, members, segments=segments), 0, 0)
        with pytest.raises(DataError, match=r"undecodable: member '(1|text)\.\w+': .*(dtype|no values)"):
            inspect_sample(raw)


def test_frame_claims_are_capped_before_anything_is_listed() -> None:
    """200,000 frames named by a json of a few megabytes read one image header, and are over the
    frame cap before any frame index is listed; a frame rate too small to divide by samples what
    there is."""
    segment = {"role": "target", "kind": "video", "frames": ["0.png"] * 200_000, "fps": 8}
    many = {"0.png": image_bytes(8, 8), "json": record("video", "", [segment])}
    started = time.perf_counter()
    _, facts = inspect_sample(RawSample("many", "s.tar", many, 0, 0))
    with pytest.raises(DataError, match="too_many_frames: video of 200000 frames"):
        plan_item(facts, DecodeOptions(), None, "s.tar", "many")
    slow = {**many, "json": record("video", "", [{**segment, "frames": ["0.png"] * 3, "fps": 1e-320}])}
    options = DecodeOptions(frame_sampling="fps", max_frames=4)
    assert (
        decode_item(RawSample("slow", "s.tar", slow, 0, 0), options).samples[0].segments[-1].data.shape[1]
        == 4
    )
    assert time.perf_counter() - started < 2.0


def pax_record(key: str, value: str) -> bytes:
    """``"%d %s=%s\\n"``: a pax record, its length counting itself."""
    body = f" {key}={value}\n".encode()
    digits = len(str(len(body)))
    digits += len(str(len(body) + digits)) > digits  # 98 bytes and 2 digits make 100, of 3
    return str(len(body) + digits).encode() + body


def pax_member(records: bytes) -> bytes:
    """A pax extended header holding ``records``, then the header of the member they apply to."""
    import tarfile

    info = tar_member_info("pax", len(records))
    info.type = tarfile.XHDTYPE
    pax = info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)
    return pax + tar_member_info("bad.json", 10).tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    "tail, reason",
    [
        (tar_member_claiming("bad.json", 1 << 40), "truncated_tar"),  # a terabyte that is not there
        (pax_member(pax_record("size", str(1 << 80))), "truncated_tar"),
        (pax_member(b"0 size=1\n"), "corrupt_tar"),  # a record length of 0 would never move on
        (pax_member(pax_record("size", "abc")), "corrupt_tar"),
        (pax_member(pax_record("size", "\u00b2")), "corrupt_tar"),  # a digit to isdigit, not to int
        (pax_member(b"99 size=1\n"), "corrupt_tar"),  # longer than the header
        (pax_member(b"9 size=1x"), "corrupt_tar"),  # no newline at its end
    ],
)
def test_a_tar_header_claim_is_a_shard_problem_after_the_good_samples(
    tmp_path: Path, tail: bytes, reason: str
) -> None:
    """The samples before it are kept (a corrupt header hides where the last one ends: it is not)."""
    path = write_shard(tmp_path / "tar.tar", {}, tail)
    started = time.perf_counter()
    index = scan_shard(path)
    assert time.perf_counter() - started < 2.0
    kept = GOOD if reason == "truncated_tar" else GOOD - 1
    assert [entry.key for entry in index.entries] == [f"good{i}" for i in range(kept)]
    assert index.problem == reason and path in index.message


CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from imontage.data import build_loader
    from imontage.models.common.sequence import PackingSpec
    sys.path.insert(0, "tools")
    import inspect_shards

    spec = PackingSpec(in_channels=4, patch_size=(1, 2, 2), max_text_len=32, layout="video3d", text_embed_dim=16)
    good, hostile, images = sys.argv[1:4]

    def epoch(shards, skip_budget):
        loader = build_loader({"shards": shards, "text_embeddings": True, "batch_size": 2, "shuffle_buffer": 0,
                               "bad_data": {"skip_budget": skip_budget}}, spec)
        for _ in range(loader.batches_in_epoch(0)):
            next(loader)
        return loader.stats().skipped_by_reason()

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    epoch(good, 0.0)
    inspect_shards.main([good, "--validate", "--no-progress"])
    base = peak_mib()
    started = time.perf_counter()
    skipped = epoch(hostile, 0.9)
    code = inspect_shards.main([f"{hostile},{images}", "--validate", "--no-progress", "--json", sys.argv[4]])
    print(json.dumps({"base_mib": base, "peak_mib": peak_mib(), "seconds": time.perf_counter() - started,
                      "skipped": skipped, "inspect": code}))
    """
)


def lie_in_index(shard: str, key: str, **segment_facts: int) -> None:
    """Rewrite the facts of ``key``'s target segment in the shard's index file (its size and mtime
    still match the shard's, so loaders take it as current)."""
    path = Path(shard + ".index.json")
    index = json.loads(path.read_text())
    [row] = [row for row in index["samples"] if row[0] == key]
    row[5]["segments"][1].update(segment_facts)
    path.write_text(json.dumps(index))


def test_claims_cost_bounded_time_and_memory(tmp_path: Path) -> None:
    """Every size claim at once, through the loader (skip mode, no token budget) and inspect_shards
    --validate, in a fresh process: no more than a good epoch's peak memory and a few seconds.
    Among them an index claiming a 268 M-token latent for a sample of 4x1x4x4 (planned from the
    index, since nothing bounds tokens without data.max_tokens) and PNG headers claiming more
    pixels, within data.bad_data.max_pixels and beyond, than their bytes hold."""
    good = write_shard(tmp_path / "good.tar", {})
    hostile = write_shard(tmp_path / "hostile.tar", size_claim_samples())
    write_index(scan_shard(hostile))
    lie_in_index(hostile, "good1", frames=HUGE[1], height=HUGE[2], width=HUGE[3])
    target = [{"role": "target", "kind": "image", "member": "0.png"}]
    images = write_shard(
        tmp_path / "images.tar",
        {f"png-{side}": {"0.png": png_claiming(side, side), "json": record("image", "", target)} for side in (4096, 65535)},
    )  # fmt: skip
    report = tmp_path / "report.json"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, good, hostile, images, str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0 and "Traceback" not in child.stderr, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(result)
    assert result["seconds"] < 5.0
    assert result["peak_mib"] - result["base_mib"] < 128  # what claims would cost: 16 GiB and more
    assert result["skipped"] == {"undecodable": len(CLAIMED_MEMBER), "unpackable": 1}
    assert result["inspect"] == 1
    problems = json.loads(report.read_text())["problems"]
    found = {key: (reason, message) for shard in problems.values() for key, reason, message in shard}
    assert (
        found["good1"][0] == "unpackable"
        and "member '1.safetensors': frames 1, the index says 64" in found["good1"][1]
    )
    assert found["png-65535"][0] == "too_many_pixels" and found["png-4096"][0] == "undecodable"
    assert all(
        found[key][0] == "undecodable" and f"member '{member}'" in found[key][1]
        for key, member in CLAIMED_MEMBER.items()
    )


# ---------------------------------------------------------------------------------------------
# facts an index understates, and text of another width


def test_an_index_that_understates_a_member_makes_its_sample_unpackable_naming_it(tmp_path: Path) -> None:
    """Planned from the index (one latent frame, 5 text rows), the sample's own headers say two
    frames: it is skipped, naming the member, and its batch is what the plan counted on."""
    longer = {"1.safetensors": array_bytes(np.ones((4, 2, 4, 4), np.float32))}
    shard = write_shard(tmp_path / "lied.tar", {"longer": latent_sample(9, longer)})
    write_index(scan_shard(shard))
    lie_in_index(shard, "longer", frames=1)
    loader = build_loader(data(shard, bad_data={"skip_budget": 0.25}), SPEC)
    assert epoch_keys(loader) == [f"good{i}" for i in range(GOOD)]
    assert loader.stats().skipped == {"unpackable": {shard: 1}}
    with pytest.raises(
        DataError,
        match=r"sample 'longer': unpackable: segment 1, member '1\.safetensors': frames 2, the index says 1",
    ):
        epoch_keys(build_loader(data(shard, bad_data={"strict": True}), SPEC))
    report = tmp_path / "report.json"
    assert inspect_shards.main([shard, "--validate", "--no-progress", "--json", str(report)]) == 1
    [(key, reason, message)] = json.loads(report.read_text())["problems"][shard]
    assert (key, reason) == ("longer", "unpackable") and "member '1.safetensors'" in message


def test_a_text_embedding_of_another_width_is_unpackable_before_decoding(tmp_path: Path) -> None:
    wide = {"text.safetensors": array_bytes(np.ones((5, 12), np.float32))}
    shard = write_shard(tmp_path / "wide.tar", {"wide": latent_sample(9, wide)})
    loader = build_loader(data(shard, bad_data={"skip_budget": 0.25}), SPEC)
    [problem] = list(loader.catalog.problems())  # known from the index
    assert (problem.reason, problem.key) == ("unpackable", "wide")
    assert "member 'text.safetensors' has width 12, the model takes 16 (model.text_dim)" in str(problem)
    assert epoch_keys(loader) == [f"good{i}" for i in range(GOOD)]
    with pytest.raises(
        DataError, match=r"sample 'wide': unpackable: 'text_embedding': member 'text\.safetensors'"
    ):
        build_loader(data(shard, bad_data={"strict": True}), SPEC)


def test_the_model_config_gives_the_text_width() -> None:
    assert packing_spec(tiny_model_config()).text_embed_dim == 0  # byte text: no width
    precomputed = tiny_model_config(text_encoder="precomputed", text_dim=24)
    assert packing_spec(precomputed).text_embed_dim == 24


# ---------------------------------------------------------------------------------------------
# index files that are not indexes


def current_index(shard: str) -> dict:
    """The index the loader would write for ``shard``, as JSON."""
    return scan_shard(shard).to_json()


def broken_indexes(shard: str) -> dict[str, bytes]:
    """Index files that are not one, by name: not JSON, JSON too deep, JSON of another type, and
    indexes of the current version whose rows are not what an index holds."""
    index = current_index(shard)

    def changed(change) -> bytes:  # noqa: ANN001 - a function editing the index in place
        copy = json.loads(json.dumps(index))
        change(copy)
        return json.dumps(copy).encode()

    def row(number: int, field: int, value: object):  # noqa: ANN202
        return lambda data: data["samples"][number].__setitem__(field, value)

    return {
        "html": b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
        "binary": bytes(range(256)),
        "empty": b"",
        "deep-list": b"[" * 100_000 + b"]" * 100_000,
        "deep-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "list": b"[1, 2, 3]",
        "string": b'"an index"',
        "no-version": b'{"samples": []}',
        "version-string": json.dumps({**index, "version": "3"}).encode(),
        "samples-not-a-list": changed(lambda data: data.__setitem__("samples", {"0": 1})),
        "short-row": changed(lambda data: data["samples"].__setitem__(0, ["good0", 0])),
        "negative-offset": changed(row(1, 1, -512)),
        "overlapping-rows": changed(row(1, 1, 0)),
        "past-the-end": changed(row(3, 1, index["file_size"])),
        "huge-number": changed(row(1, 2, 10**400)),
        "unknown-problem": changed(row(0, 3, "exploded")),
        "facts-and-problem": changed(row(0, 3, "undecodable")),
        "facts-of-another-type": changed(row(0, 5, [1, 2])),
        "facts-field-type": changed(lambda data: data["samples"][0][5].__setitem__("text_bytes", "many")),
        "segment-field": changed(lambda data: data["samples"][0][5]["segments"][0].__setitem__("height", -3)),
        "shard-problem": changed(lambda data: data.__setitem__("problem", ["not_a_tar"])),
    }


@pytest.fixture(scope="module")
def indexed_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shard(tmp_path_factory.mktemp("indexed") / "indexed.tar", {})


def test_each_broken_index_file_stops_the_loader_and_inspect_shards_naming_it(
    indexed_shard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(indexed_shard + ".index.json")
    for name, content in broken_indexes(indexed_shard).items():
        path.write_bytes(content)
        with pytest.raises(InputError, match=str(path)):
            build_loader(data(indexed_shard), SPEC)
        assert inspect_shards.main([indexed_shard, "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"inspect_shards: {path}: ") and err.count("\n") == 1, (name, err)
    path.unlink()


def test_write_index_replaces_a_broken_index_file(indexed_shard: str, tmp_path: Path) -> None:
    path = Path(indexed_shard + ".index.json")
    path.write_bytes(b"<html>503</html>")
    assert inspect_shards.main([indexed_shard, "--write-index", "--no-progress"]) == 0
    assert read_sidecar(indexed_shard) is not None
    path.unlink()


def test_the_command_line_tools_end_in_one_line_and_status_2(indexed_shard: str, tmp_path: Path) -> None:
    """The scripts as run: an index file nested past Python's recursion limit (inspect_shards, and
    imontage-train on it), an index dir holding a list; a spec naming no file, a VAE folder whose
    config.json is not JSON (encode_shards). No traceback."""
    index_dir = tmp_path / "indexes"
    index_dir.mkdir()
    (index_dir / "indexed.tar.index.json").write_bytes(b"[]")
    vae = tmp_path / "vae"  # a model folder whose config.json is an error page
    vae.mkdir()
    (vae / "config.json").write_text("<html>403 Forbidden</html>")
    deep = Path(indexed_shard + ".index.json")
    deep.write_bytes(b'{"version": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    runs = {
        str(deep): ["tools/inspect_shards.py", indexed_shard, "--validate", "--no-progress"],
        str(index_dir / "indexed.tar.index.json"): [
            "tools/inspect_shards.py", f"pipe:cat {indexed_shard}", "--index-dir", str(index_dir), "--no-progress",
        ],
        "matches no file": ["tools/encode_shards.py", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "o"), "--vae", "v"],
        str(vae / "config.json"): ["tools/encode_shards.py", indexed_shard, "--out", str(tmp_path / "o"), "--vae", str(vae)],
        f"imontage-train: {deep}": [
            "-m", "imontage.train.cli", "configs/recipes/quickstart.yaml", f"data.shards={indexed_shard}",
            f"run_dir={tmp_path / 'run'}", "train.progress=false",
        ],
    }  # fmt: skip
    commands = " ".join(
        f"({shlex.join([sys.executable, *argv])} 2>{tmp_path / f'err{i}'}; echo $? >{tmp_path / f'rc{i}'}) &"
        for i, argv in enumerate(runs.values())
    )  # side by side: most of each run is importing torch
    subprocess.run(["bash", "-c", commands + " wait"], cwd=REPO, check=True, timeout=300, capture_output=True)
    deep.unlink()
    for i, named in enumerate(runs):
        err, code = (tmp_path / f"err{i}").read_text(), int((tmp_path / f"rc{i}").read_text())
        logged = named.startswith("imontage-train")  # the trainer logs its set-up before it
        last = err.splitlines()[-1] if err else ""
        assert code == 2 and "Traceback" not in err and named in last and (logged or err.count("\n") == 1), (
            err
        )

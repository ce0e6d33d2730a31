"""Reading shards: specs, the tar reader (offsets, truncation), `pipe:` commands, and decoding samples."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save as save_safetensors

from imontage.data import decode_sample, expand_shards, load_image, preview_samples
from imontage.data.buckets import fit_image, frame_bucket, nearest_bucket, sample_frame_indices
from imontage.data.decode import DecodeOptions, decode_item
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, ShardProblem, ShardWriter, iter_samples, iter_tar, read_shard
from imontage.dataprep.synthetic import write_shards
from imontage.dataprep.testing import broken_png, image_bytes, pattern, video_bytes
from imontage.models.common.sequence import PackingSpec

NUM_SAMPLES = 24  # 4 shards of 7, 7, 7, 3 samples
SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=64, layout="montage")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, samples=NUM_SAMPLES, per_shard=7, seed=0, progress=False)
    return out


def raw_samples(shard_dir: Path) -> dict[str, RawSample]:
    return {raw.key: raw for path in sorted(shard_dir.glob("*.tar")) for raw in read_shard(str(path))}


def make_raw(members: dict[str, bytes], key: str = "k", url: str = "s.tar") -> RawSample:
    return RawSample(key, url, members, 0, 0)


def record(*segments: dict, text: str = "", **fields: object) -> bytes:
    return json.dumps({"task": "t", "text": text, "segments": list(segments), **fields}).encode()


# ---------------------------------------------------------------------------------------------
# shard specs


def test_expand_shards_globs_ranges_lists_and_commands(shard_dir: Path) -> None:
    names = [str(shard_dir / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(shard_dir / "train-*.tar")) == names
    assert expand_shards(str(shard_dir / "train-{000001..000002}.tar")) == names[1:3]
    listed = f"{shard_dir}/train-{{000003..000003}}.tar, {shard_dir}/train-*.tar,{names[0]}"
    assert expand_shards(listed) == [names[3], names[0], names[1], names[2]]
    # Commands are brace-expanded but not checked until they run.
    assert expand_shards("pipe:curl -s https://x/d-{00..02}.tar") == [
        f"pipe:curl -s https://x/d-0{i}.tar" for i in range(3)
    ]


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
# the tar reader


def test_samples_carry_offsets_a_reader_can_seek_to(shard_dir: Path) -> None:
    path = shard_dir / "train-000001.tar"
    samples = list(read_shard(str(path)))
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(7, 14)]
    with open(path, "rb") as stream:
        stream.seek(samples[4].offset)
        resumed = list(iter_samples(stream, str(path), start=samples[4].offset))
    assert [(s.key, s.members, s.offset) for s in resumed] == [
        (s.key, s.members, s.offset) for s in samples[4:]
    ]
    assert sum(s.nbytes for s in samples) + 1024 <= path.stat().st_size  # + end-of-archive blocks


def cut(data: bytes, size: int) -> io.BytesIO:
    return io.BytesIO(data[:size])


def test_tar_reader_reports_where_data_stops(shard_dir: Path) -> None:
    data = (shard_dir / "train-000000.tar").read_bytes()
    with pytest.raises(
        ShardProblem, match=r"truncated_tar: the data stops at byte 1000, inside member '000000.0.png'"
    ):
        list(iter_tar(cut(data, 1000)))
    first_member_end = next(iter_tar(io.BytesIO(data))).end
    with pytest.raises(ShardProblem, match="before the end-of-archive marker"):  # cut at a member boundary
        list(iter_tar(cut(data, first_member_end)))
    with pytest.raises(ShardProblem, match="not_a_tar: the file is empty"):
        list(iter_tar(io.BytesIO(b"")))
    with pytest.raises(ShardProblem, match="not_a_tar: no tar header at byte 0"):
        list(iter_tar(io.BytesIO(b"<html>404</html>" * 64)))
    corrupt = data[:first_member_end] + b"garbage!" * 64 + data[first_member_end + 512 :]
    with pytest.raises(ShardProblem, match=f"corrupt_tar: invalid tar header at byte {first_member_end}"):
        list(iter_tar(io.BytesIO(corrupt)))


def test_truncated_shard_yields_its_complete_samples_only(shard_dir: Path) -> None:
    data = (shard_dir / "train-000000.tar").read_bytes()
    samples = list(iter_samples(io.BytesIO(data), "s"))
    inside_third = samples[2].offset + 700
    got = []
    with pytest.raises(ShardProblem):
        got.extend(iter_samples(cut(data, inside_third), "s"))
    assert [s.key for s in got] == [samples[0].key, samples[1].key]


def test_long_names_and_duplicate_keys(tmp_path: Path) -> None:
    long_key = "d/" + "x" * 150
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in (
            f"{long_key}.json",
            f"{long_key}.0.png",
            "b.json",
            "b.json",
            "c.json",
            f"{long_key}.json",
        ):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    samples = list(read_shard(str(path)))
    assert [(s.key, sorted(s.members), s.duplicate) for s in samples] == [
        (long_key, ["0.png", "json"], False),
        ("b", ["json"], False),
        ("b", ["json"], True),  # a repeated member name starts a second sample with the same key
        ("c", ["json"], False),
        (long_key, ["json"], True),
    ]


def test_pipe_runs_an_argument_list_without_a_shell(shard_dir: Path, tmp_path: Path) -> None:
    odd = tmp_path / "a; touch pwned.tar"  # a shell would run `touch`
    odd.write_bytes((shard_dir / "train-000002.tar").read_bytes())
    samples = list(read_shard(f"pipe:cat '{odd}'"))
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(14, 21)]
    assert not (Path.cwd() / "pwned.tar").exists() and not (tmp_path / "pwned.tar").exists()
    with pytest.raises(
        ShardProblem, match=r"read_error: 'cat /nonexistent.tar' exited with status 1: .*No such file"
    ):
        list(read_shard("pipe:cat /nonexistent.tar"))


# ---------------------------------------------------------------------------------------------
# decoding


def test_decode_edit_montage_and_video(shard_dir: Path) -> None:
    raws = raw_samples(shard_dir)
    [edit] = decode_sample(raws["000000"])
    assert edit.task == "edit" and edit.key == "000000"
    assert [(s.kind, s.role) for s in edit.segments] == [
        ("text", "condition"),
        ("image", "condition"),
        ("image", "target"),
    ]
    assert edit.segments[0].text == json.loads(raws["000000"].members["json"])["text"]
    assert [tuple(s.data.shape) for s in edit.segments[1:]] == [(3, 1, 32, 32)] * 2  # type: ignore[union-attr]
    [montage] = decode_sample(raws["000001"])
    assert {tuple(s.data.shape) for s in montage.segments[1:]} == {(3, 1, 32, 48)}  # type: ignore[union-attr]
    [video] = decode_sample(raws["000002"], spec=SPEC)
    condition, target = video.segments[1].data, video.segments[2].data
    assert condition is not None and target is not None
    assert tuple(condition.shape) == (3, 1, 32, 32) and tuple(target.shape) == (3, 4, 32, 32)
    # Frame 2 of the video is member 3.png, as x/127.5 - 1 of its RGB pixels.
    pixels = np.asarray(Image.open(io.BytesIO(raws["000002"].members["3.png"])).convert("RGB"))  # [H, W, 3]
    assert torch.equal(target[:, 2], torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)


def test_decode_errors_name_shard_key_member_and_reason(shard_dir: Path) -> None:
    raw = raw_samples(shard_dir)["000002"]
    members = dict(raw.members)
    del members["3.png"]
    with pytest.raises(
        DataError, match=r"shard s\.tar, sample 'k': missing_member: segment 1: member '3\.png'"
    ):
        decode_sample(make_raw(members))
    with pytest.raises(DataError, match=r"sample 'k': undecodable: member '0\.png'"):
        decode_sample(make_raw({**raw.members, "0.png": broken_png(32, 32)}))
    with pytest.raises(DataError, match=r"sample 'k': format_mismatch: member '0\.png'"):
        decode_sample(make_raw({**raw.members, "0.png": b"not a png"}))
    with pytest.raises(DataError, match=r"bad_json: member 'json' is not UTF-8 json"):
        decode_sample(make_raw({**raw.members, "json": b'{"task": '}))
    misspelt = record({"role": "target", "kind": "image", "member": "0.png", "anchr": 2})
    with pytest.raises(DataError, match=r"bad_json: segment 0: unknown field\(s\) anchr"):
        decode_sample(make_raw({**raw.members, "json": misspelt}))


def test_members_that_need_pickle_are_never_loaded() -> None:
    pickled = record({"role": "target", "kind": "latent", "member": "z.pth"})
    with pytest.raises(DataError, match=r"unsafe_member: segment 0: member 'z\.pth' would need pickle"):
        decode_sample(make_raw({"json": pickled, "z.pth": b"\x80\x04."}))
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    latent = record({"role": "target", "kind": "latent", "member": "z.npy"})
    with pytest.raises(DataError, match="unsafe_member: member 'z.npy': an object array"):
        decode_sample(make_raw({"json": latent, "z.npy": objects.getvalue()}))


def test_latents_and_text_embeddings() -> None:
    latent = np.arange(4 * 2 * 8 * 8, dtype=np.float32).reshape(4, 2, 8, 8)
    stored = io.BytesIO()
    np.save(stored, latent[:, 0])  # [C, H, W]: one frame
    embedding = save_safetensors({"t5": np.ones((5, 16), np.float16)})
    members = {
        "a.npy": stored.getvalue(),
        "b.safetensors": save_safetensors({"latent": latent, "other": latent[:1]}),
        "t.safetensors": embedding,
        "json": record(
            {"role": "condition", "kind": "latent", "member": "a.npy"},
            {"role": "target", "kind": "latent", "member": "b.safetensors", "tensor": "latent"},
            text="a caption",
            text_embedding="t.safetensors",
        ),
    }
    [as_text] = decode_sample(make_raw(members))
    assert as_text.segments[0].text == "a caption"
    assert torch.equal(as_text.segments[1].data, torch.from_numpy(latent[:, :1]))  # type: ignore[arg-type]
    assert torch.equal(as_text.segments[2].data, torch.from_numpy(latent))  # type: ignore[arg-type]
    [as_embedding] = decode_sample(make_raw(members), DecodeOptions(text_embeddings=True))
    text = as_embedding.segments[0]
    assert text.text is None and text.data is not None and text.data.shape == (5, 16)
    unnamed = {**members, "json": record({"role": "target", "kind": "latent", "member": "b.safetensors"})}
    with pytest.raises(DataError, match=r"holds tensors \['latent', 'other'\]: the segment must name one"):
        decode_sample(make_raw(unnamed))


def test_preference_pair_becomes_win_then_lose_sharing_conditions() -> None:
    members = {name: image_bytes(16, 16, seed=i) for i, name in enumerate(("c.png", "w.png", "l.png"))}
    members["json"] = record(
        {"role": "condition", "kind": "image", "member": "c.png"},
        {"role": "target", "kind": "image", "member": "w.png", "group": "win"},
        {"role": "target", "kind": "image", "member": "l.png", "group": "lose"},
        text="same prompt",
    )
    item = decode_item(make_raw(members), DecodeOptions(), SPEC)
    win, lose = item.samples
    assert (win.key, lose.key) == ("k#win", "k#lose")
    assert torch.equal(win.segments[1].data, lose.segments[1].data)  # type: ignore[arg-type]
    assert not torch.equal(win.segments[2].data, lose.segments[2].data)  # type: ignore[arg-type]
    assert item.tokens == 2 * (len("same prompt") + 2 * 16)  # two samples of text + two 4x4 patch grids
    members["json"] = record({"role": "target", "kind": "image", "member": "w.png", "group": "win"})
    with pytest.raises(DataError, match="a preference pair needs both 'win' and 'lose'"):
        decode_sample(make_raw(members))


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_videos_are_sampled_capped_and_bucketed(container: str) -> None:
    members = {
        "v." + container: video_bytes(12, 32, 48, container, fps=8, seed=3),
        "json": record({"role": "target", "kind": "video", "member": "v." + container}),
    }
    options = DecodeOptions(
        frame_stride=2, max_frames=5, frame_buckets=(2, 4), video_buckets=((16, 16), (16, 24))
    )
    [sample] = decode_sample(make_raw(members), options, SPEC)
    video = sample.segments[0].data
    assert video is not None and tuple(video.shape) == (3, 4, 16, 24)  # frames 0, 2, 4, 6; 32x48 -> 16x24
    expected = fit_image(Image.fromarray(pattern(32, 48, 3, frame=6)), (16, 24))
    decoded = ((video[:, 3].permute(1, 2, 0) + 1) * 127.5).numpy()
    assert np.abs(decoded - np.asarray(expected, dtype=np.float32)).mean() < 12  # lossy codec, same frame
    by_fps = DecodeOptions(frame_sampling="fps", frame_rate=2.0, max_frames=16)
    [sample] = decode_sample(make_raw(members), by_fps, SPEC)
    assert sample.segments[0].data.shape[1] == 3  # type: ignore[union-attr]  # frames 0, 4, 8 of 12 at 8 fps


# ---------------------------------------------------------------------------------------------
# buckets and frame sampling


def test_nearest_bucket_prefers_aspect_then_area() -> None:
    buckets = [(32, 32), (32, 48), (64, 64), (48, 32)]
    assert nearest_bucket(1000, 1000, buckets) == (64, 64)
    assert nearest_bucket(20, 20, buckets) == (32, 32)
    assert nearest_bucket(300, 460, buckets) == (32, 48)
    assert nearest_bucket(90, 60, buckets) == (48, 32)


def test_fit_image_covers_and_centre_crops() -> None:
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 12:68] = 255  # white but for 12 columns each side
    fitted = np.asarray(fit_image(Image.fromarray(pixels), (20, 20)))
    assert fitted.shape == (20, 20, 3) and fitted.min() == 255  # the centred 40x40 crop is all white
    same = Image.fromarray(pixels)
    assert fit_image(same, (40, 80)) is same


def test_frame_sampling_and_frame_buckets() -> None:
    assert sample_frame_indices(10, 30.0, "stride", 3, 0.0, 16) == [0, 3, 6, 9]
    assert sample_frame_indices(100, 30.0, "stride", 1, 0.0, 4) == [0, 1, 2, 3]
    assert sample_frame_indices(31, 30.0, "fps", 1, 10.0, 16) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert sample_frame_indices(10, 24.0, "fps", 1, 10.0, 16) == [0, 2, 5, 7]
    assert frame_bucket(7, (1, 4, 8), 1) == 4
    assert frame_bucket(3, (4, 8), 1) == 0
    assert frame_bucket(7, (), 2) == 6


# ---------------------------------------------------------------------------------------------
# previews and images


def test_preview_samples_are_the_first_in_stored_order(shard_dir: Path) -> None:
    samples = preview_samples({"shards": str(shard_dir / "train-*.tar")}, 9)
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(9)]


def test_load_image_keeps_its_size(tmp_path: Path) -> None:
    Image.fromarray(pattern(12, 20, 0)).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.shape == (3, 1, 12, 20)
    expected = torch.from_numpy(pattern(12, 20, 0)).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(image[:, 0], expected)


def test_shard_writer_is_deterministic(tmp_path: Path) -> None:
    for name in ("a.tar", "b.tar"):
        with ShardWriter(tmp_path / name) as writer:
            writer.add_sample("s0", {"json": b"{}", "0.png": image_bytes(8, 8)})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not list(tmp_path.glob("*.partial"))

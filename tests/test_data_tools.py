"""tools/make_shards.py (manifest -> deterministic shards) and tools/inspect_shards.py (report, --validate)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import REPO

from imontage.config.schema import DataConfig
from imontage.data import build_loader
from imontage.data import index as index_module
from imontage.data.index import read_sidecar
from imontage.data.loader import StreamLoader
from imontage.dataprep.testing import image_bytes, video_bytes, write_bad_shards
from imontage.models.common.sequence import PackingSpec


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_shards, inspect_shards = load_tool("make_shards"), load_tool("inspect_shards")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real files of every kind, and a manifest naming them (paths relative to it)."""
    root = tmp_path_factory.mktemp("files")
    (root / "media").mkdir()
    for i, fmt in enumerate(("jpg", "png", "webp")):
        (root / "media" / f"scene{i}.{fmt}").write_bytes(image_bytes(32, 48, fmt, seed=i))
    (root / "media" / "clip.mp4").write_bytes(video_bytes(9, 32, 32, "mp4"))
    (root / "media" / "clip.webm").write_bytes(video_bytes(6, 32, 48, "webm"))
    for i in range(3):
        (root / "media" / f"f{i}.png").write_bytes(image_bytes(16, 16, "png", seed=10 + i))
    latent = io.BytesIO()
    np.save(latent, np.zeros((3, 2, 8, 8), np.float32))
    (root / "media" / "z.npy").write_bytes(latent.getvalue())
    image = {"kind": "image", "role": "condition"}
    lines = [
        {"task": "edit", "text": "make it blue", "segments": [{**image, "path": "media/scene0.jpg"}, {**image, "role": "target", "path": "media/scene1.png"}]},
        {"task": "video", "text": "a clip", "segments": [{**image, "path": "media/scene2.webp"}, {"kind": "video", "role": "target", "path": "media/clip.mp4"}]},
        {"task": "video", "segments": [{"kind": "video", "role": "target", "path": "media/clip.webm"}]},
        {"task": "frames", "segments": [{"kind": "video", "role": "target", "frames": [f"media/f{i}.png" for i in range(3)], "fps": 4}]},
        {"task": "latent", "segments": [{"kind": "latent", "role": "target", "path": "media/z.npy"}]},
    ]  # fmt: skip
    lines = [dict(line) for line in lines * 3]
    lines[-3]["key"] = "webm-clip"
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_make_shards_is_deterministic_and_loadable(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for out in ("a", "b"):
        assert (
            make_shards.main(
                [str(manifest), "--out", str(tmp_path / out), "--maxcount", "4", "--no-progress"]
            )
            == 0
        )
    first = sorted((tmp_path / "a").glob("shard-*.tar"))
    assert [p.name for p in first] == [f"shard-{i:06d}.tar" for i in range(4)]  # 15 samples, 4 per shard
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in first)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary == {"samples": 15, "shards": 4, "bytes": sum(p.stat().st_size for p in first),
                       "tasks": {"edit": 3, "frames": 3, "latent": 3, "video": 6}, "problems": 0}  # fmt: skip
    assert "wrote 15 samples in 4 shards" in capsys.readouterr().out
    assert all(read_sidecar(str(p)) is not None for p in first)  # current indexes beside the shards

    spec = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="video3d")
    loader = build_loader(
        DataConfig(shards=str(tmp_path / "a" / "shard-*.tar"), batch_size=2, shuffle_buffer=0), spec
    )
    assert isinstance(loader, StreamLoader)
    keys = []
    for _ in range(loader.batches_in_epoch(0)):
        next(loader)
        assert loader.last is not None
        keys += [key for _, key in loader.last.keys]
    assert keys[:2] == ["000000001", "000000002"] and "webm-clip" in keys
    assert loader.stats().skipped == {}


def test_make_shards_splits_by_size_and_names_bad_lines(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        make_shards.main(
            [str(manifest), "--out", str(tmp_path / "s"), "--maxsize", "8KB", "--no-progress", "--no-index"]
        )
        == 0
    )
    shards = sorted((tmp_path / "s").glob("shard-*.tar"))
    assert len(shards) > 2 and not list((tmp_path / "s").glob("*.index.json"))
    assert all(p.stat().st_size <= 8 * 1024 + 10240 for p in shards)  # + end-of-archive record padding
    bad = manifest.with_name("bad.jsonl")
    bad.write_text(
        '{"segments": [{"kind": "image", "path": "media/scene0.jpg"}]}\n{"segments": [{"kind": "image", "path": "nope.png"}]}\n'
    )
    assert make_shards.main([str(bad), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert f"{bad}:2, segment 0: cannot read" in capsys.readouterr().err
    bad.write_text('{"segments": [{"kind": "latent", "path": "w.pth"}]}\n')
    assert make_shards.main([str(bad), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "would need pickle" in capsys.readouterr().err


def test_inspect_shards_reports_and_validates(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_shards.main([str(manifest), "--out", str(tmp_path / "good"), "--no-progress", "--no-index"])
    report = tmp_path / "report.json"
    code = inspect_shards.main(
        [
            str(tmp_path / "good" / "*.tar"),
            "--validate",
            "--write-index",
            "--json",
            str(report),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "problems: none" in out and "image resolutions (9):" in out and "32x48" in out
    data = json.loads(report.read_text())
    assert data["samples"] == 15 and data["video_frames"] == {"2-3": 3, "4-7": 3, "8-15": 3}
    assert read_sidecar(str(tmp_path / "good" / "shard-000000.tar")) is not None

    write_bad_shards(tmp_path / "bad")
    code = inspect_shards.main(
        [str(tmp_path / "bad" / "*.tar"), "--validate", "--max-pixels", "4096", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 1
    for shard, key, reason in [
        ("bad-000000.tar", "a1", "bad_json"), ("bad-000001.tar", "b2", "undecodable"),  # b2: found by decoding
        ("bad-000002.tar", "c1", "too_many_pixels"), ("bad-000004.tar", "(shard)", "not_a_tar"),
    ]:  # fmt: skip
        assert any(shard in line and f"{key}: " in line and reason in line for line in out.splitlines()), (
            shard,
            key,
        )


def test_shards_read_by_commands_take_their_indexes_from_an_index_dir(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_shards.main(
        [str(manifest), "--out", str(tmp_path / "s"), "--maxcount", "4", "--no-progress", "--no-index"]
    )
    urls = f"pipe:cat {tmp_path}/s/shard-{{000000..000003}}.tar"
    index_dir = tmp_path / "indexes"
    index_dir.mkdir()
    assert inspect_shards.main([urls, "--write-index", "--index-dir", str(index_dir), "--no-progress"]) == 0
    assert sorted(p.name for p in index_dir.iterdir()) == [f"shard-{i:06d}.tar.index.json" for i in range(4)]

    def no_scanning(url: str) -> None:
        raise AssertionError(f"{url} was read to index it")

    monkeypatch.setattr(index_module, "scan_shard", no_scanning)
    spec = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="video3d")
    cfg = DataConfig(shards=urls, index_dir=str(index_dir), batch_size=2, shuffle_buffer=0)
    loader = build_loader(cfg, spec)
    next(loader)
    assert loader.last is not None and loader.last.keys[0] == (
        f"pipe:cat {tmp_path}/s/shard-000000.tar",
        "000000001",
    )

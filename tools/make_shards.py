"""Write WebDataset shards (and their indexes) from a JSONL manifest of real files.

    python tools/make_shards.py manifest.jsonl --out data/mine [--maxcount 1000] [--maxsize 1GB]

One manifest line per sample; paths are relative to the manifest:

    {"task": "edit", "text": "make it snow",
     "segments": [{"role": "condition", "kind": "image", "path": "in/0001.jpg"},
                  {"role": "target", "kind": "image", "path": "out/0001.jpg"}]}

Optional per line: "key" (default: the line number, zero-padded), "text_embedding" (a path to a
.npy/.safetensors [L, E] array). Per segment: "path", or "frames" (a list of image paths) for a
video of frame images, and "fps", "anchor", "group", "tensor" as in the sample schema
(docs/data.md). A file whose bytes are not the format its extension names (or a video whose
container or codec is not allowed) is refused, as the loader would skip it. Member names inside
a sample are ``<segment>.<ext>`` (``<segment>.<frame>.<ext>`` for frame images). The same manifest and files always give byte-identical shards: samples in
manifest order, members sorted, tar headers without times or owners. Writes ``summary.json``
(samples, shards, bytes, per-task counts) and, beside each shard, its ``.index.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imontage.data.index import scan_shard, write_index
from imontage.data.media import MediaError, check_format, load_array
from imontage.data.records import (
    ARRAY_EXTENSIONS,
    IMAGE_EXTENSIONS,
    PICKLE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    extension,
)
from imontage.data.shards import ShardWriter

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # a WebDataset key ends at the first dot
_PASSED = ("role", "fps", "anchor", "group", "tensor")
_KIND_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS, "latent": ARRAY_EXTENSIONS}


class ManifestError(ValueError):
    """A manifest line that cannot become a sample; the message starts with ``file:line``."""


def parse_size(text: str) -> int:
    """``"1GB"``, ``"500M"``, ``"4096"`` -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 500MB or 1GB")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


@dataclass
class Sample:
    key: str
    task: str
    members: dict[str, bytes]

    @property
    def tar_bytes(self) -> int:
        """Bytes the sample takes in a tar: a 512-byte header per member, data padded to 512."""
        return sum(512 + -(-len(data) // 512) * 512 for data in self.members.values())


def _read_file(
    base: Path, path: Any, allowed: tuple[str, ...], where: str, tensor: str | None = None
) -> tuple[str, bytes]:
    if not isinstance(path, str):
        raise ManifestError(f"{where}: expected a path, got {path!r}")
    suffix = extension(path)
    if suffix in PICKLE_EXTENSIONS:
        raise ManifestError(f"{where}: {path} would need pickle to load; use .npy or .safetensors")
    if suffix not in allowed:
        raise ManifestError(f"{where}: {path} is not one of .{', .'.join(allowed)}")
    try:
        data = (base / path).read_bytes()
    except OSError as error:
        raise ManifestError(f"{where}: cannot read {base / path} ({error.strerror})") from error
    try:
        # The loader's checks: the bytes are what the extension says; an array holds no NaN or Inf
        # (which only decoding finds: the index could not count it).
        check_format(data, suffix)
        if suffix in ARRAY_EXTENSIONS:
            load_array(data, suffix, tensor)
    except MediaError as error:
        if error.reason in ("format_mismatch", "non_finite"):
            raise ManifestError(f"{where}: {path}: {error.reason}: {error}") from None
        # other problems (a broken file) are written, and counted by the shard index
    return suffix, data


def _segment(base: Path, index: int, entry: Any, members: dict[str, bytes], where: str) -> dict[str, Any]:
    """The json entry of segment ``index``; its files go into ``members``."""
    if not isinstance(entry, dict) or entry.get("kind") not in _KIND_EXTENSIONS:
        raise ManifestError(f"{where}: expected an object with kind image, video or latent, got {entry!r}")
    unknown = sorted(set(entry) - {"kind", "path", "frames", *_PASSED})
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")
    record = {"kind": entry["kind"], **{name: entry[name] for name in _PASSED if name in entry}}
    if entry["kind"] == "video" and "frames" in entry:
        frames = entry["frames"]
        if not isinstance(frames, list) or not frames:
            raise ManifestError(f"{where}: 'frames' must be a non-empty list of image paths")
        names = []
        for number, path in enumerate(frames):
            suffix, data = _read_file(base, path, IMAGE_EXTENSIONS, f"{where}, frame {number}")
            names.append(f"{index}.{number}.{suffix}")
            members[names[-1]] = data
        return {**record, "frames": names}
    tensor = entry.get("tensor") if isinstance(entry.get("tensor"), str) else None
    suffix, data = _read_file(base, entry.get("path"), _KIND_EXTENSIONS[entry["kind"]], where, tensor)
    members[f"{index}.{suffix}"] = data
    return {**record, "member": f"{index}.{suffix}"}


def manifest_sample(base: Path, line: dict[str, Any], number: int, where: str) -> Sample:
    """The sample of one manifest line: its json member and its files, read."""
    key = str(line.get("key", f"{number:09d}"))
    if not _KEY.match(key):
        raise ManifestError(f"{where}: key '{key}' may hold only letters, digits, '_' and '-'")
    segments = line.get("segments")
    if not isinstance(segments, list) or not segments:
        raise ManifestError(f"{where}: needs a non-empty 'segments' list")
    members: dict[str, bytes] = {}
    record: dict[str, Any] = {"task": str(line.get("task", "")), "text": str(line.get("text", ""))}
    if "text_embedding" in line:
        suffix, members[f"text.{suffix}"] = _read_file(base, line["text_embedding"], ARRAY_EXTENSIONS, where)
        record["text_embedding"] = f"text.{suffix}"
    record["segments"] = [
        _segment(base, i, entry, members, f"{where}, segment {i}") for i, entry in enumerate(segments)
    ]
    try:
        members["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate, written as a json escape
        raise ManifestError(f"{where}: text that is not Unicode ({error.reason})") from None
    return Sample(key, record["task"], members)


def read_manifest(path: Path) -> Iterator[Sample]:
    seen: set[str] = set()
    with path.open("rb") as lines:  # json.loads decodes each line, and names one that is not UTF-8
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = json.loads(text)
            except ValueError as error:
                raise ManifestError(f"{where}: not json ({error})") from None
            except RecursionError:
                raise ManifestError(f"{where}: not json (nested too deeply to read)") from None
            if not isinstance(line, dict):
                raise ManifestError(f"{where}: expected an object")
            sample = manifest_sample(path.parent, line, number, where)
            if sample.key in seen:
                raise ManifestError(f"{where}: key '{sample.key}' is used by an earlier line")
            seen.add(sample.key)
            yield sample


@dataclass
class Summary:
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    tasks: Counter[str] = field(default_factory=Counter)
    problems: int = 0  # samples the index found unreadable (headers, members)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "shards": len(self.shards),
            "bytes": self.bytes,
            "tasks": dict(sorted(self.tasks.items())),
            "problems": self.problems,
        }

    def line(self) -> str:
        tasks = ", ".join(f"{task or '(none)'} {count}" for task, count in sorted(self.tasks.items()))
        problems = (
            f"; {self.problems} samples with problems (see tools/inspect_shards.py)" if self.problems else ""
        )
        return f"wrote {self.samples} samples in {len(self.shards)} shards ({self.bytes:,} bytes); per task: {tasks}{problems}"


def write_shards(
    samples: Iterator[Sample],
    out: Path,
    pattern: str,
    maxcount: int,
    maxsize: int,
    index: bool,
    progress: bool,
) -> Summary:
    """Fill shards in order: a new one when the next sample would pass ``maxcount`` or ``maxsize``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    writer: ShardWriter | None = None

    def close() -> None:
        assert writer is not None
        writer.commit()
        summary.bytes += Path(writer.path).stat().st_size
        if index:
            shard_index = scan_shard(writer.path)
            summary.problems += sum(entry.problem is not None for entry in shard_index.entries)
            write_index(shard_index)

    with tqdm(desc="samples", unit="sample", disable=not progress) as bar:
        try:
            for sample in samples:
                full = writer is not None and (
                    writer.samples >= maxcount
                    or (writer.samples and writer.size + sample.tar_bytes > maxsize)
                )
                if writer is None or full:
                    if writer is not None:
                        close()
                    writer = ShardWriter(out / pattern.format(len(summary.shards)))
                    summary.shards.append(writer.path)
                writer.add_sample(sample.key, sample.members)
                summary.samples += 1
                summary.tasks[sample.task] += 1
                bar.update(1)
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
    if writer is not None:
        close()
    _remove_stale_shards(out, pattern, len(summary.shards))
    return summary


def _remove_stale_shards(out: Path, pattern: str, count: int) -> None:
    """Shards numbered past ``count`` from an earlier, larger run, which a glob would read too."""
    while (stale := out / pattern.format(count)).exists():
        stale.unlink()
        Path(f"{stale}.index.json").unlink(missing_ok=True)
        count += 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", type=Path, help="JSONL file, one sample per line")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the shards, their indexes and summary.json"
    )
    parser.add_argument(
        "--pattern", default="shard-{:06d}.tar", help="shard file names (default: %(default)s)"
    )
    parser.add_argument(
        "--maxcount", type=int, default=1000, help="samples per shard at most (default: %(default)s)"
    )
    parser.add_argument(
        "--maxsize", type=parse_size, default=parse_size("1GB"), help="bytes per shard at most (default: 1GB)"
    )
    parser.add_argument("--no-index", action="store_true", help="do not write <shard>.index.json files")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.maxcount < 1 or args.maxsize < 1:
        parser.error("--maxcount and --maxsize must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        samples = read_manifest(args.manifest)
        summary = write_shards(
            samples,
            args.out,
            args.pattern,
            args.maxcount,
            args.maxsize,
            not args.no_index,
            not args.no_progress,
        )
    except (ManifestError, OSError) as error:
        print(f"make_shards: {error}", file=sys.stderr)
        return 2
    (args.out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

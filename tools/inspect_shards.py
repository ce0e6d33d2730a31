"""Describe WebDataset shards: counts, sizes, resolution and frame histograms, and their problems.

    python tools/inspect_shards.py 'data/mine/shard-*.tar' [--validate] [--write-index [--index-dir D]] [--json report.json]

Reads each shard's index (its ``.index.json`` when current, else the shard's json and media
headers, with the loader's checks: a member whose bytes are not the format its extension names
is a ``format_mismatch``). ``--validate`` also decodes every sample, as training would at its
stored size, loads every array member (``non_finite`` when one holds NaN or Inf), and exits with
status 1 when any shard or sample has a problem; problems are listed by shard and key.
``--write-index`` writes the indexes beside local shards, or into ``--index-dir`` (by shard file
name; the folder to give as ``data.index_dir``), so loaders need not read the shards to plan
their epochs; it replaces an index file that is not one. Anything that stops it (a spec naming
no file, an index file that is not one) is one line on standard error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from imontage.data.decode import DecodeOptions, check_array_members, decode_item
from imontage.data.index import ShardIndex, read_sidecar, scan_shard, write_index
from imontage.data.problems import DataError
from imontage.data.records import parse_record
from imontage.data.shards import ShardProblem, expand_shards, read_shard
from imontage.untrusted import InputError

_TOP = 12  # histogram rows printed


@dataclass
class Report:
    shards: list[dict[str, Any]] = field(default_factory=list)
    tasks: Counter[str] = field(default_factory=Counter)
    image_sizes: Counter[str] = field(default_factory=Counter)  # "HxW" -> images
    video_sizes: Counter[str] = field(default_factory=Counter)
    video_frames: Counter[str] = field(default_factory=Counter)  # power-of-two bin -> videos
    sample_bytes: list[int] = field(default_factory=list)
    problems: dict[str, list[tuple[str | None, str, str]]] = field(
        default_factory=dict
    )  # shard -> (key, reason, message)

    def problem(self, error: DataError) -> None:
        self.problems.setdefault(error.shard, []).append((error.key, error.reason, str(error)))

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "samples": sum(shard["samples"] for shard in self.shards),
            "bytes": sum(shard["bytes"] for shard in self.shards),
            "tasks": dict(self.tasks),
            "image_sizes": dict(self.image_sizes.most_common()),
            "video_sizes": dict(self.video_sizes.most_common()),
            "video_frames": dict(
                sorted(self.video_frames.items(), key=lambda item: int(item[0].split("-")[0]))
            ),
            "problems": {shard: [list(p) for p in problems] for shard, problems in self.problems.items()},
        }


def frames_bin(frames: int) -> str:
    """1, 2-3, 4-7, 8-15, ...: power-of-two bins."""
    low = 1 << (max(frames, 1).bit_length() - 1)
    return str(low) if low == 1 else f"{low}-{2 * low - 1}"


def add_index(report: Report, index: ShardIndex) -> None:
    report.shards.append(
        {
            "url": index.url,
            "samples": len(index),
            "bytes": sum(entry.nbytes for entry in index.entries),
            "problems": sum(entry.problem is not None for entry in index.entries)
            + (index.problem is not None),
        }
    )
    for error in index.problems():
        report.problem(error)
    for entry in index.entries:
        report.sample_bytes.append(entry.nbytes)
        if entry.facts is None:
            continue
        report.tasks[entry.facts.task] += 1
        for segment in entry.facts.segments:
            size = f"{segment.height}x{segment.width}"
            if segment.kind == "image":
                report.image_sizes[size] += 1
            elif segment.kind == "video":
                report.video_sizes[size] += 1
                report.video_frames[frames_bin(segment.frames)] += 1


def validate_shard(report: Report, index: ShardIndex, options: DecodeOptions) -> None:
    """Decode every sample the index found readable, as training would at its stored size, and
    load every array member it names (training loads only those its model reads); add the
    failures to the report. A sample whose headers say other than the index is one of them."""
    try:
        for entry, raw in zip(index.entries, read_shard(index.url), strict=False):
            if raw.key != entry.key:
                detail = f"expected sample '{entry.key}' here: the shard changed since it was indexed"
                report.problem(DataError.of("corrupt_tar", index.url, raw.key, detail))
                return
            if entry.problem:
                continue
            try:
                decode_item(raw, options, facts=entry.facts)
                check_array_members(raw, parse_record(raw).array_members)
            except DataError as error:
                report.problem(error)
    except ShardProblem:
        pass  # already in the index


def _histogram(
    title: str, counts: Counter[str], ordered: Iterable[tuple[str, int]] | None = None
) -> list[str]:
    if not counts:
        return []
    rows = list(ordered) if ordered is not None else counts.most_common(_TOP)
    width = max(rows, key=lambda row: row[1])[1]
    lines = [f"{title} ({sum(counts.values())}):"]
    lines += [
        f"  {label:>12}  {count:8d}  {'#' * max(1, round(40 * count / width))}" for label, count in rows
    ]
    if ordered is None and len(counts) > _TOP:
        lines.append(f"  ... {len(counts) - _TOP} more")
    return lines


def format_report(report: Report) -> str:
    data = report.to_json()
    sizes = sorted(report.sample_bytes) or [0]
    lines = [
        f"{len(report.shards)} shards, {data['samples']} samples, {data['bytes'] / 1e6:.1f} MB "
        f"(per sample: min {sizes[0]:,} B, median {sizes[len(sizes) // 2]:,} B, max {sizes[-1]:,} B)",
        "per task: " + ", ".join(f"{task or '(none)'} {count}" for task, count in report.tasks.most_common()),
        "per shard:",
    ]
    lines += [
        f"  {s['samples']:8d} samples {s['bytes'] / 1e6:10.1f} MB {s['problems']:6d} problems  {s['url']}"
        for s in report.shards
    ]
    lines += _histogram("image resolutions", report.image_sizes)
    lines += _histogram("video resolutions", report.video_sizes)
    frames = sorted(report.video_frames.items(), key=lambda item: int(item[0].split("-")[0]))
    lines += _histogram("video frames", report.video_frames, frames)
    count = sum(len(problems) for problems in report.problems.values())
    lines.append(f"problems: {count}" if count else "problems: none")
    for shard, problems in report.problems.items():
        lines.append(f"  {shard}")
        lines += [f"    {key or '(shard)'}: {message}" for key, _, message in problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "shards", help="shard spec: globs, brace ranges, paths or pipe: commands, comma-separated"
    )
    parser.add_argument("--validate", action="store_true", help="decode every sample; exit 1 on any problem")
    parser.add_argument("--write-index", action="store_true", help="write <shard>.index.json files")
    parser.add_argument(
        "--index-dir", default="", help="read and write indexes here (default: beside local shards)"
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    defaults = DecodeOptions()
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="pixel cap of --validate")
    parser.add_argument(
        "--max-video-frames", type=int, default=defaults.max_video_frames, help="frame cap of --validate"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def read_index(url: str, index_dir: str, replace_broken: bool) -> tuple[ShardIndex, bool]:
    """The shard's index, and whether it came from a current index file. An index file that is
    not one is an :class:`InputError`, or with ``replace_broken`` passed over (and reported)."""
    try:
        index = read_sidecar(url, index_dir)
    except InputError as error:
        if not replace_broken:
            raise
        print(f"inspect_shards: {error}: writing it again", file=sys.stderr)
        index = None
    return (index, True) if index is not None else (scan_shard(url), False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = DecodeOptions(max_pixels=args.max_pixels, max_video_frames=args.max_video_frames)
    report = Report()
    try:
        urls = expand_shards(args.shards)
        for url in tqdm(urls, desc="shards", unit="shard", disable=args.no_progress):
            index, current = read_index(url, args.index_dir, replace_broken=args.write_index)
            if args.write_index and not current:
                write_index(index, args.index_dir)
            add_index(report, index)
            if args.validate:
                validate_shard(report, index, options)
        print(format_report(report))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as file:
                json.dump(report.to_json(), file, indent=2)
    except (InputError, ValueError, OSError) as error:  # a spec naming nothing, a broken index file
        print(f"inspect_shards: {error}", file=sys.stderr)
        return 2
    return 1 if args.validate and report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

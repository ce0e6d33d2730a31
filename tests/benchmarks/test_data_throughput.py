"""Data pipeline throughput: imontage's loader against a plain WebDataset loop over the same shards.

    make bench BENCH_ARGS="-k data_throughput --bench-workers 2"

Both read one epoch of the same shards with the same number of DataLoader workers. The plain loop
is ``webdataset.WebDataset(urls, shardshuffle=False).decode("rgb", <PyAV for mp4/webm>)``: it
decodes every member to float RGB and yields samples one by one. imontage's loader also shuffles,
resizes to buckets, packs under a token budget and carries its resume state with every batch.
Reported: samples/s, MB/s of shard data, and the ratio (target: >= 0.9x), each the median of
``repeats`` epochs taken in turns (plain, imontage, plain, ...) so that both meet the same load.
Not a pass/fail test.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from imontage.config.schema import BucketConfig, DataConfig
from imontage.data import build_loader
from imontage.data.index import scan_shard, write_index
from imontage.data.loader import StreamLoader
from imontage.dataprep.testing import mixed_buckets, write_mixed_shards
from imontage.models.common.sequence import PackingSpec

# (shards, samples per shard, size scale): "small" runs in a minute on 2 CPU cores.
SIZES = {"small": (4, 96, 4), "full": (16, 256, 8)}
SPEC = PackingSpec(in_channels=3, patch_size=(1, 16, 16), max_text_len=64, layout="video3d")
MAX_TOKENS = {4: 4096, 8: 16384}  # per scale: a few samples per micro-batch


def decode_video(key: str, data: bytes) -> Any:
    """The plain loop's video handler: every frame, float RGB in [0, 1], like .decode("rgb") for images."""
    if key.rsplit(".", 1)[-1] not in ("mp4", "webm"):
        return None
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames).astype(np.float32) / 255.0


def plain_epoch(urls: list[str], workers: int) -> tuple[int, float]:
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb", decode_video)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    started, samples = time.perf_counter(), 0
    for _ in loader:
        samples += 1
    return samples, time.perf_counter() - started


def imontage_epoch(cfg: DataConfig, workers: int) -> tuple[int, float, dict[str, float]]:
    started = time.perf_counter()
    loader = build_loader(cfg, SPEC)
    assert isinstance(loader, StreamLoader)
    for _ in range(loader.batches_in_epoch(0)):
        next(loader)
    elapsed = time.perf_counter() - started
    stats = loader.stats()
    loader.close()
    return (
        stats.samples_emitted,
        elapsed,
        {"padding": stats.padding, "bytes_read": stats.bytes_read, "read": stats.samples_read},
    )


def median_runs(runs: Sequence[Callable[[], tuple]], repeats: int) -> list[tuple]:
    """The median-time result of each of ``runs``, repeated in turns so that they share any load."""
    results: list[list[tuple]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results, strict=True):
            out.append(run())
    return [min(out, key=lambda r: abs(r[1] - statistics.median(x[1] for x in out))) for out in results]


@pytest.mark.benchmark
def test_data_throughput(bench_options: dict, tmp_path: Path) -> None:
    shards, per_shard, scale = SIZES[bench_options["size"]]
    workers, repeats = bench_options["workers"], bench_options["repeats"] or 3
    started = time.perf_counter()
    urls = write_mixed_shards(tmp_path, [per_shard] * shards, seed=0, scale=scale)
    made = time.perf_counter() - started
    started = time.perf_counter()
    for url in urls:  # production shards come with indexes from tools/make_shards.py
        write_index(scan_shard(url))
    indexed = time.perf_counter() - started
    total_bytes = sum(os.path.getsize(url) for url in urls)

    cfg = DataConfig(
        shards=",".join(urls), max_tokens=MAX_TOKENS[scale], batch_size=0, pack_buffer=32, shuffle_buffer=64,
        num_workers=workers, buckets=BucketConfig(**mixed_buckets(scale)),  # type: ignore[arg-type]
    )  # fmt: skip
    (plain_samples, plain_time), (ours_samples, ours_time, extra) = median_runs(
        [lambda: plain_epoch(urls, workers), lambda: imontage_epoch(cfg, workers)], repeats
    )

    rows = [
        {"pipeline": "webdataset .decode(rgb)", "samples": plain_samples, "seconds": plain_time,
         "samples_per_s": plain_samples / plain_time, "mb_per_s": total_bytes / 1e6 / plain_time, "padding": ""},
        {"pipeline": "imontage build_loader", "samples": ours_samples, "seconds": ours_time,
         "samples_per_s": ours_samples / ours_time, "mb_per_s": extra["bytes_read"] / 1e6 / ours_time,
         "padding": f"{extra['padding']:.4f}"},
    ]  # fmt: skip
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"\ndata throughput: {shards} shards x {per_shard} samples, scale {scale} ({total_bytes / 1e6:.1f} MB), "
          f"{workers} workers, median of {repeats}; machine: {machine}")  # fmt: skip
    print(f"  (writing the shards took {made:.1f} s, indexing them {indexed:.1f} s)")
    for row in rows:
        print(f"  {row['pipeline']:26} {row['samples']:6d} samples {row['seconds']:7.2f} s "
              f"{row['samples_per_s']:9.1f} samples/s {row['mb_per_s']:8.2f} MB/s")  # fmt: skip
    print(f"  ratio imontage / plain: {ratio:.2f}x (target >= 0.9x); padding {extra['padding']:.2%}")

    path = Path(bench_options["csv_dir"]) / "data_throughput.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["size", "workers", "machine", *rows[0], "ratio"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    "size": bench_options["size"],
                    "workers": workers,
                    "machine": machine,
                    **row,
                    "ratio": f"{ratio:.3f}",
                }
            )
    assert plain_samples == shards * per_shard and ours_samples > 0

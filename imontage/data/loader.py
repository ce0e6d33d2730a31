"""The trainer's data loader: per dataset, DataLoader workers each running a :class:`WorkerStream`.

The main process takes batches from its workers round-robin (torch's DataLoader order for
iterable datasets) and keeps, per worker, the state attached to the last batch it *consumed*;
batches a worker prefetched are not part of the saved state. A restored loader starts its
workers from those states, rotated so that DataLoader worker 0 plays the worker whose turn is
next. Hence, for a fixed (seed, ranks, workers), the batches after a restore are exactly those
of an uninterrupted run.

``build_loader`` gives a :class:`StreamLoader` for ``data.shards``, or a :class:`MixtureLoader`
drawing each batch from one of ``data.datasets`` by weights that may change with the step.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imontage.config.schema import DataConfig
from imontage.data import media
from imontage.data.catalog import Catalog, PackingLimits
from imontage.data.decode import DecodeOptions, decode_item
from imontage.data.mixture import MixtureSchedule, draw_dataset
from imontage.data.plan import Sharding, plan_epoch
from imontage.data.problems import DataError, DataStats
from imontage.data.shards import ShardProblem, expand_shards, read_shard
from imontage.data.stream import StreamSettings, WorkerBatch, WorkerStream
from imontage.models.common.sequence import PackedBatch, PackingSpec, Sample

STATE_VERSION = 1


@dataclass
class BatchInfo:
    """What the last batch a loader returned holds (PackedBatch itself carries tensors only)."""

    dataset: str
    worker: int
    epoch: int
    keys: list[tuple[str, str]] = field(default_factory=list)  # (shard, key) per item
    tasks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _StreamFactory:
    """Makes the stream of one logical worker (picklable, for spawned worker processes)."""

    catalog: Catalog
    options: DecodeOptions
    spec: PackingSpec
    settings: StreamSettings
    rank: int

    def __call__(self, worker: int, state: dict | None) -> WorkerStream:
        return WorkerStream(self.catalog, self.options, self.spec, self.settings, self.rank, worker, state)


class _WorkerStreams(IterableDataset):
    """What each DataLoader worker runs: the stream of the logical worker whose turn its id is."""

    def __init__(
        self, make_stream: _StreamFactory, num_streams: int, states: list[dict | None], rotation: int
    ) -> None:
        self.make_stream = make_stream
        self.num_streams = num_streams
        self.states = states  # per logical worker: the state to resume from, or None to start
        self.rotation = rotation  # the logical worker DataLoader worker 0 plays: the one whose turn is next

    def __iter__(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.num_streams
        return iter(self.make_stream(worker, self.states[worker]))


def _unchanged(item: Any) -> Any:
    """The DataLoader's collate function: worker batches are already batches."""
    return item


class StreamLoader:
    """Endless :class:`PackedBatch` iterator over one dataset for one rank; resumable exactly."""

    def __init__(
        self,
        name: str,
        catalog: Catalog,
        options: DecodeOptions,
        spec: PackingSpec,
        settings: StreamSettings,
        rank: int,
        num_workers: int,
        prefetch: int = 2,
    ) -> None:
        if settings.sharding.num_workers != max(1, num_workers):
            raise ValueError("settings.sharding.num_workers must be max(1, num_workers)")
        self.name, self.catalog, self.settings, self.rank = name, catalog, settings, rank
        self.num_workers, self.prefetch = num_workers, prefetch
        self.num_streams = settings.sharding.num_workers
        self._factory = _StreamFactory(catalog, options, spec, settings, rank)
        self._states: list[dict | None] = [None] * self.num_streams
        self.consumed = 0  # batches returned since the start of training
        self.last: BatchInfo | None = None
        self._iterator: Iterator[WorkerBatch] | None = None

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> PackedBatch:
        if self._iterator is None:
            self._iterator = self._start()
        item = next(self._iterator)
        self._states[item.worker] = item.state
        self.consumed += 1
        self.last = BatchInfo(self.name, item.worker, item.epoch, item.keys, item.tasks)
        return item.batch

    def _start(self) -> Iterator[WorkerBatch]:
        streams = _WorkerStreams(
            self._factory, self.num_streams, list(self._states), self.consumed % self.num_streams
        )
        if self.num_workers == 0:
            return iter(streams)
        loader = DataLoader(
            streams,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_unchanged,
            prefetch_factor=self.prefetch,
        )
        return iter(loader)

    def set_step(self, step: int) -> None:
        """Nothing changes with the step for one dataset (see :class:`MixtureLoader`)."""

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank's loader returns in ``epoch``, whatever its shards' sizes."""
        plan = plan_epoch(
            self.catalog, self.settings.sharding, self.settings.limits, self.settings.skip_budget, epoch
        )
        return plan.batches_per_worker * self.num_streams

    # ----------------------------------------------------------------------------------- state
    def _identity(self) -> dict[str, Any]:
        sharding = self.settings.sharding
        return {
            "dataset": self.name,
            "seed": sharding.seed,
            "rank": self.rank,
            "world_size": sharding.world_size,
            "num_workers": self.num_streams,
            "num_shards": len(self.catalog.shards),
            "num_samples": self.catalog.num_samples,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: per worker, its state after the last batch consumed from it."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "consumed": self.consumed,
            "workers": list(self._states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the last batch the loader that saved ``state`` returned."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')}, this loader reads {STATE_VERSION}"
            )
        expected = self._identity()
        differs = [
            f"{key} {state.get(key)!r} -> {value!r}"
            for key, value in expected.items()
            if state.get(key) != value
        ]
        if differs:
            raise ValueError(f"the loader state was saved by another data setup: {'; '.join(differs)}")
        self.close()
        self._states = list(state["workers"])
        self.consumed = int(state["consumed"])

    def close(self) -> None:
        """Stop the worker processes now (a later batch starts them again from the current state)."""
        iterator, self._iterator = self._iterator, None
        # Released, the DataLoader iterator would shut its workers down only when collected, which
        # a traceback holding it can put off; torch has no public call for this.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    # ---------------------------------------------------------------------------------- counters
    def stats(self) -> DataStats:
        return DataStats.total(DataStats.from_dict(state["stats"]) for state in self._states if state)

    def metrics(self) -> dict[str, float]:
        values = self.stats().scalars()
        if self.last is not None:
            values["epoch"] = self.last.epoch
        return values

    def summary_lines(self) -> list[str]:
        return [
            f"dataset {self.name}: {len(self.catalog.shards)} shards, {self.catalog.num_samples} samples"
        ] + [f"  {line}" for line in self.stats().summary_lines()]


class MixtureLoader:
    """Each batch from one dataset, drawn by the schedule's weights at the current step."""

    def __init__(
        self, loaders: dict[str, StreamLoader], schedule: MixtureSchedule, seed: int, rank: int
    ) -> None:
        if list(loaders) != schedule.names:
            raise ValueError("the schedule must name the datasets in loader order")
        self.loaders, self.schedule, self.seed, self.rank = loaders, schedule, seed, rank
        self.step = 0
        self.draws = 0  # the mixture RNG is counter-based: this is its whole state
        self.last: BatchInfo | None = None

    def __iter__(self) -> MixtureLoader:
        return self

    def set_step(self, step: int) -> None:
        """The training step the next batches are for (the trainer calls this before each)."""
        self.step = step

    def __next__(self) -> PackedBatch:
        names = list(self.loaders)
        choice = names[draw_dataset(self.schedule.weights(self.step), self.seed, self.rank, self.draws)]
        self.draws += 1
        loader = self.loaders[choice]
        batch = next(loader)
        self.last = loader.last
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "draws": self.draws,
            "datasets": {name: loader.state_dict() for name, loader in self.loaders.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or list(state.get("datasets", {})) != list(self.loaders):
            raise ValueError(
                f"the loader state holds datasets {list(state.get('datasets', {}))}, not {list(self.loaders)}"
            )
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["datasets"][name])
        self.draws = int(state["draws"])

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()

    def stats(self) -> DataStats:
        return DataStats.total(loader.stats() for loader in self.loaders.values())

    def metrics(self) -> dict[str, float]:
        values = self.stats().scalars()
        for name, weight in zip(self.loaders, self.schedule.weights(self.step), strict=True):
            values[f"weight/{name}"] = weight
        for name, loader in self.loaders.items():
            values[f"batches/{name}"] = loader.consumed
        return values

    def summary_lines(self) -> list[str]:
        lines = [f"mixture of {len(self.loaders)} datasets after {self.draws} batches"]
        for loader in self.loaders.values():
            lines.extend(loader.summary_lines())
        return lines


Loader = StreamLoader | MixtureLoader


# ---------------------------------------------------------------------------------------------
# construction


def with_defaults(data_cfg: Any) -> DictConfig:
    """``data_cfg`` (a DataConfig, a config node or a dict; possibly only ``shards``) over the schema defaults."""
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), data_cfg)
    assert isinstance(merged, DictConfig)
    return merged


def dataset_sources(cfg: DictConfig) -> list[tuple[str, str, float]]:
    """(name, shard spec, weight) of each dataset: ``data.datasets``, or ``data.shards`` as one."""
    if cfg.datasets:
        return [(str(d.name), str(d.shards), float(d.weight)) for d in cfg.datasets]
    if not cfg.shards:
        raise ValueError("data: set either 'shards' or 'datasets'")
    return [("data", str(cfg.shards), 1.0)]


def _stream_loader(
    cfg: DictConfig, spec: PackingSpec, name: str, shards: str, stream: int, rank: int, world_size: int
) -> StreamLoader:
    options = DecodeOptions.from_config(cfg)
    limits = PackingLimits(max_tokens=int(cfg.max_tokens), max_samples=int(cfg.batch_size))
    catalog = Catalog.build(expand_shards(shards), options, spec, limits, str(cfg.index_dir))
    if cfg.bad_data.strict:
        first = next(catalog.problems(), None)
        if first is not None:
            raise first
    sharding = Sharding(
        int(cfg.seed), stream, int(cfg.shuffle_buffer) > 0, world_size, max(1, int(cfg.num_workers))
    )
    settings = StreamSettings(
        sharding=sharding,
        limits=limits,
        shuffle_buffer=int(cfg.shuffle_buffer),
        pack_buffer=int(cfg.pack_buffer),
        skip_budget=0.0 if cfg.bad_data.strict else float(cfg.bad_data.skip_budget),  # strict skips nothing
        strict=bool(cfg.bad_data.strict),
    )
    loader = StreamLoader(
        name, catalog, options, spec, settings, rank, int(cfg.num_workers), int(cfg.prefetch)
    )
    loader.batches_in_epoch(0)  # fails now, naming the data, if an epoch cannot make a batch
    return loader


def build_loader(data_cfg: DataConfig | Any, spec: PackingSpec, rank: int = 0, world_size: int = 1) -> Loader:
    """The training loader of a recipe's ``data`` section for data-parallel rank ``rank`` of ``world_size``.

    Every rank must build it with the same config; they then agree on the samples of each epoch
    (each read by one rank) and on the number of batches, without talking to each other.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    cfg = with_defaults(data_cfg)
    sources = dataset_sources(cfg)
    loaders = {
        name: _stream_loader(cfg, spec, name, shards, stream, rank, world_size)
        for stream, (name, shards, _) in enumerate(sources)
    }
    if not cfg.datasets:
        return loaders[sources[0][0]]
    points = [
        (int(point.step), {str(k): float(v) for k, v in point.weights.items()}) for point in cfg.mixture
    ]
    schedule = MixtureSchedule([name for name, _, _ in sources], [weight for _, _, weight in sources], points)
    return MixtureLoader(loaders, schedule, int(cfg.seed), rank)


# ---------------------------------------------------------------------------------------------
# previews and single images


def _dataset_items(
    urls: Sequence[str], options: DecodeOptions, spec: PackingSpec | None, strict: bool = False
) -> Iterator[list[Sample]]:
    """The trainable samples of each item of the shards, in stored order (two for a preference pair);
    bad shards and samples are passed over, or with ``strict`` raised as a :class:`DataError`."""
    for url in urls:
        try:
            for raw in read_shard(url):
                if raw.duplicate:
                    continue
                try:
                    yield decode_item(raw, options, spec).samples
                except DataError:
                    if strict:
                        raise
        except ShardProblem as problem:
            if strict:
                raise DataError.of(problem.reason, url, None, problem.detail) from problem


def preview_samples(data_cfg: Any, count: int, spec: PackingSpec | None = None) -> list[Sample]:
    """The first ``count`` samples in stored order (taken in turn from each dataset of a mixture),
    decoded as training decodes them: a fixed set to sample from."""
    cfg = with_defaults(data_cfg)
    options = DecodeOptions.from_config(cfg)
    streams = [
        (sample for item in _dataset_items(expand_shards(shards), options, spec) for sample in item)
        for _, shards, _ in dataset_sources(cfg)
    ]
    samples: list[Sample] = []
    while streams and len(samples) < count:
        for stream in list(streams):
            sample = next(stream, None)
            if sample is None:
                streams.remove(stream)
            elif len(samples) < count:
                samples.append(sample)
    return samples


def heldout_items(
    shards: str, data_cfg: Any, count: int, spec: PackingSpec | None = None
) -> list[list[Sample]]:
    """The first ``count`` items of ``shards`` in stored order, each its samples (a preference pair:
    winner, loser), decoded as training decodes the ``data_cfg`` section's samples: a held-out set.

    Nothing is passed over: a bad shard or sample raises :class:`DataError` naming it, since a set
    that silently lost part of itself would report another loss.
    """
    cfg = with_defaults(data_cfg)
    items = _dataset_items(expand_shards(shards), DecodeOptions.from_config(cfg), spec, strict=True)
    return list(itertools.islice(items, count))


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as a ``[3, 1, H, W]`` segment in [-1, 1], at its own size."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        size = media.image_size(data)
        pixels = media.decode_image(data, size)  # [H, W, 3] uint8
    except media.MediaError as error:
        raise ValueError(f"{path}: {error}") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(1).float() / 127.5 - 1.0

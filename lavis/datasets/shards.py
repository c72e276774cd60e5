"""Webdataset shards: index them up front and stream them under DDP.

Shards are written by ``python -m lavis.datasets.pack_shards`` (the layout is described there). The
packer is a tool: readers never import it, so that running it as ``-m`` finds no copy of it already
imported by ``lavis.datasets``.

Streaming (``ShardDataset``): when the dataset is built the shards are indexed
(tar headers, and every JSON member parsed and checked -- the up-front check);
iteration then seeks straight to each image's bytes. Each epoch the shard order
is shuffled (train role, seeded by ``seed + epoch``) and the resulting sequence of
N records is cut into ``world_size`` contiguous ranges that differ by at most
one record; each DataLoader worker takes a contiguous part of its rank's range.
So ranks are disjoint and together cover every record exactly once. With
``uneven: pad`` (the default) ranks short of ceil(N / world) repeat the first
records of their own range so that every rank runs the same number of steps
(at most world-1 repeats per epoch, logged); ``uneven: exact`` gives each rank
exactly its share. The runner must call ``set_epoch(epoch)`` before each epoch
(as with DistributedSampler) and must not give this dataset a sampler.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lavis.common.errors import DataError
from lavis.datasets.samples import BadSample, SampleFormat, SampleSource, decode_image, describe_record

__all__ = [
    "IMAGE_EXTENSIONS",
    "REQUIRED_FIELDS",
    "Shard",
    "ShardDataset",
    "ShardSample",
    "current_rank_world",
    "expand_pattern",
    "index_shard",
    "rank_range",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
REQUIRED_FIELDS = {
    "caption_train": ("image_id", "caption"),
    "caption_eval": ("image_id", "captions"),
    "vqa": ("image_id", "question_id", "question", "answers", "answer"),
}


# ---------------------------------------------------------------------------------------------- indexing
@dataclass
class ShardSample:
    key: str
    offset: int  # byte offset of the image data inside the tar
    size: int
    records: list[dict]


@dataclass
class Shard:
    path: str
    samples: list[ShardSample] = field(default_factory=list)

    @property
    def num_records(self) -> int:
        return sum(len(s.records) for s in self.samples)


def expand_pattern(pattern: str | list[str]) -> list[str]:
    """Shard paths of a brace pattern (``train-{000000..000009}.tar``) or a list of paths/patterns."""
    import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [path for p in patterns for path in braceexpand.braceexpand(str(p))]


def index_shard(path: str, sample_format: SampleFormat) -> Shard:
    """Read a shard's headers and JSON members; DataError naming the shard and key for anything wrong."""
    if not os.path.isfile(path):
        raise DataError(f"shard not found: {path}")
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext.lower()] = info
            metas = {key: tar.extractfile(m["json"]).read() for key, m in members.items() if "json" in m}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable tar shard: {err}") from None
    shard = Shard(path)
    required = REQUIRED_FIELDS[sample_format.name]
    for key in order:
        where = f"{path}: sample {key!r}"
        images = [ext for ext in members[key] if ext in IMAGE_EXTENSIONS]
        if key not in metas or not images:
            raise DataError(f"{where} needs an image member and a .json member, has {sorted(members[key])}")
        try:
            meta = json.loads(metas[key])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{where}: the .json member is not valid JSON: {err}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("records"), list) or not meta["records"]:
            raise DataError(f"{where}: the .json member needs a non-empty list 'records'")
        if meta.get("format") != sample_format.name:
            raise DataError(
                f"{where}: packed as {meta.get('format')!r} samples but this split reads {sample_format.name!r} "
                "(a train split packed for eval, or the reverse?)"
            )
        for i, record in enumerate(meta["records"]):
            missing = [f for f in required if not isinstance(record, dict) or f not in record]
            if missing:
                raise DataError(f"{where}: records[{i}] lacks field(s) {', '.join(missing)}")
        info = members[key][images[0]]
        shard.samples.append(ShardSample(key, info.offset_data, info.size, meta["records"]))
    return shard


# ---------------------------------------------------------------------------------------------- streaming
def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous [start, end) of ``total`` records owned by ``rank``; sizes differ by at most one."""
    return rank * total // world, (rank + 1) * total // world


def current_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(SampleSource, torch.utils.data.IterableDataset):  # SplitDataset via SampleSource
    """Records stored in webdataset shards, streamed with an exact per-rank partition (module docstring)."""

    def __init__(
        self,
        shards: list[Shard],
        sample_format: SampleFormat,
        vis_processor: Callable,
        text_processor: Callable[[str], str],
        on_bad_sample: str = "error",
        name: str = "shards",
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        uneven: str = "pad",
        annotation_file: str | None = None,
        question_file: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(
            sample_format, vis_processor, text_processor, on_bad_sample, name, annotation_file, question_file
        )
        self.shards = shards
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.uneven = uneven
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.num_records = sum(s.num_records for s in shards)

    # --- bookkeeping the runner uses ----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the shard order of ``epoch`` (call before iterating, like DistributedSampler)."""
        self.epoch = int(epoch)

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size) used for the partition."""
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return current_rank_world()

    def __len__(self) -> int:
        """Records this rank yields per epoch."""
        rank, world = self.rank_world()
        start, end = rank_range(self.num_records, rank, world)
        return math.ceil(self.num_records / world) if self.uneven == "pad" else end - start

    def sample_ids(self) -> list[int]:
        """Every sample id of the whole split (all ranks), in stored order."""
        key = self.sample_id_key
        return list(dict.fromkeys(r[key] for s in self.shards for sample in s.samples for r in sample.records))

    # --- the partition --------------------------------------------------------------------------
    def epoch_sequence(self) -> list[tuple[int, int, int]]:
        """Every record of the epoch as (shard, sample, record) in this epoch's shard order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return [
            (i, j, k)
            for i in order
            for j, sample in enumerate(self.shards[i].samples)
            for k in range(len(sample.records))
        ]

    def rank_positions(self, rank: int, world: int) -> list[int]:
        """Positions in the epoch sequence that ``rank`` yields (its range, plus padding under ``pad``)."""
        start, end = rank_range(self.num_records, rank, world)
        positions = list(range(start, end))
        if self.uneven == "pad":
            target = math.ceil(self.num_records / world)
            short = target - len(positions)
            if short:
                source = positions or list(range(self.num_records))
                positions += [source[i % len(source)] for i in range(short)]
                logger.warning(
                    "%s: %d records do not divide over %d ranks; rank %d repeats %d record(s) this epoch "
                    "(uneven: pad) so that all ranks run the same number of steps",
                    self.name,
                    self.num_records,
                    world,
                    rank,
                    short,
                )
        return positions

    def worker_positions(self) -> list[int]:
        """This DataLoader worker's contiguous share of this rank's positions."""
        rank, world = self.rank_world()
        positions = self.rank_positions(rank, world)
        info = torch.utils.data.get_worker_info()
        if info is None:
            return positions
        lo, hi = rank_range(len(positions), info.id, info.num_workers)
        return positions[lo:hi]

    # --- iteration ----------------------------------------------------------------------------
    def _references(self) -> Iterator[tuple[int, int, int]]:
        sequence = self.epoch_sequence()
        refs = (sequence[p] for p in self.worker_positions())
        if not (self.shuffle and self.shuffle_buffer > 1):
            yield from refs
            return
        info = torch.utils.data.get_worker_info()
        rank, _ = self.rank_world()
        rng = random.Random(hash((self.seed, self.epoch, rank, info.id if info else 0)))
        buffer: list = []
        for ref in refs:
            buffer.append(ref)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        handles: dict[int, object] = {}
        cached: tuple | None = None  # (shard, sample, image): records of one image come together
        last_good, owed = None, 0
        try:
            for i, j, k in self._references():
                sample = self.shards[i].samples[j]
                record = sample.records[k]
                try:
                    if cached is None or cached[:2] != (i, j):
                        cached = (i, j, self._read_image(handles, i, sample))
                    item = self.sample_format.make_item(record, self.vis_processor(cached[2]), self.text_processor)
                except BadSample as err:
                    if self.on_bad_sample == "error":
                        raise DataError(
                            f"{err} ({describe_record(record)}; set on_bad_sample: skip to replace)"
                        ) from None
                    self._skipped.add()
                    logger.warning(
                        "%s: skipped bad sample %s, replaced by a neighbour: %s",
                        self.name,
                        describe_record(record),
                        err,
                    )
                    if last_good is None:
                        owed += 1
                    else:
                        yield last_good
                    continue
                last_good = item
                yield item
                while owed:
                    owed -= 1
                    yield last_good
            if owed:
                raise DataError(f"{self.name}: every sample of a worker's share could not be read")
        finally:
            for handle in handles.values():
                handle.close()

    def _read_image(self, handles: dict, i: int, sample: ShardSample):
        path = self.shards[i].path
        where = f"{path}: sample {sample.key!r}"
        try:
            if i not in handles:
                handles[i] = open(path, "rb")
            handle = handles[i]
            handle.seek(sample.offset)
            data = handle.read(sample.size)
        except OSError as err:
            raise BadSample(f"{where}: cannot read the shard: {err}") from err
        if len(data) != sample.size:
            raise BadSample(f"{where}: the shard is truncated")
        return decode_image(data, where)

"""Webdataset shards: pack a split into tar files, and stream them under DDP.

Shard layout (one tar sample per image, written with ``webdataset.TarWriter``)::

    <key>.jpg|.png|...   the original image file bytes, not re-encoded
    <key>.json           {"format": "caption_train" | "caption_eval" | "vqa",
                          "image_id": ..., "records": [record, ...]}

``records`` are the builder's records of that image without ``image_path`` (one
per caption for caption training, one per question for VQA), so a shard split
reads back to exactly the items of the image split.

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

CLI::

    python -m lavis.datasets.shards --builder coco_caption --split train --out DIR \
        [--cfg-path project.yaml] [--options datasets.coco_caption.build_info.images=...] \
        [--samples-per-shard 1000]

prints the shard pattern to put in ``build_info`` (``shards``) with ``data_type: webdataset``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lavis.common.errors import DataError
from lavis.datasets.base import BadSample, SampleFormat, SkipCounter, decode_image, describe_record

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
REQUIRED_FIELDS = {
    "caption_train": ("image_id", "caption"),
    "caption_eval": ("image_id", "captions"),
    "vqa": ("image_id", "question_id", "question", "answers", "answer"),
}


# ---------------------------------------------------------------------------------------------- packing
def group_by_image(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Records grouped by image file, in order of each image's first record."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["image_path"], []).append(record)
    return list(groups.items())


def _write_shard(path: Path, samples: list[dict]) -> None:
    """Write one tar atomically (temporary file, fsync, rename)."""
    import webdataset

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = webdataset.TarWriter(handle, encoder=False, mtime=0)
            for sample in samples:
                writer.write(sample)
            writer.tarstream.close()  # the end-of-archive blocks, without closing our handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def pack_records(
    records: list[dict], sample_format: SampleFormat, out_dir: str | Path, prefix: str, samples_per_shard: int = 1000
) -> str:
    """Pack records (with ``image_path``) into ``out_dir/prefix-NNNNNN.tar``; returns the brace pattern."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by_image(records)
    if not groups:
        raise DataError(f"nothing to pack into {out_dir}/{prefix}-*.tar: the split is empty")
    num_shards = math.ceil(len(groups) / samples_per_shard)
    for shard in range(num_shards):
        samples = []
        for n, (image_path, recs) in enumerate(groups[shard * samples_per_shard:(shard + 1) * samples_per_shard]):
            ext = Path(image_path).suffix.lstrip(".").lower() or "jpg"
            try:
                image_bytes = Path(image_path).read_bytes()
            except OSError as err:
                raise DataError(f"cannot read image {image_path} ({describe_record(recs[0])}): {err}") from None
            meta = {
                "format": sample_format.name,
                "image_id": recs[0]["image_id"],
                "records": [{k: v for k, v in r.items() if k != "image_path"} for r in recs],
            }
            key = f"s{shard * samples_per_shard + n:09d}"
            samples.append({"__key__": key, ext: image_bytes, "json": json.dumps(meta).encode("utf-8")})
        _write_shard(out_dir / f"{prefix}-{shard:06d}.tar", samples)
    return str(out_dir / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


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


class ShardDataset(torch.utils.data.IterableDataset):
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
        super().__init__()
        self.shards = shards
        self.sample_format = sample_format
        self.sample_id_key = sample_format.sample_id_key
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.on_bad_sample = on_bad_sample
        self.name = name
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.uneven = uneven
        self.annotation_file = annotation_file
        self.question_file = question_file
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.num_records = sum(s.num_records for s in shards)
        self._skipped = SkipCounter()

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

    @property
    def num_skipped(self) -> int:
        """Samples replaced because their image could not be decoded (this rank, all workers)."""
        return self._skipped.value

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
                    self.name, self.num_records, world, rank, short,
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
                        raise DataError(f"{err} ({describe_record(record)}; set on_bad_sample: skip to replace)") from None
                    self._skipped.add()
                    logger.warning("%s: skipped bad sample %s, replaced by a neighbour: %s", self.name, describe_record(record), err)
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


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """Pack one split of a builder into shards and print the pattern."""
    from omegaconf import OmegaConf

    from lavis.common.config import dataset_default_path, parse_options, read_yaml
    from lavis.common.registry import registry
    from lavis.datasets.builders.base import check_image_files

    parser = argparse.ArgumentParser(description="Pack a COCO-caption or VQAv2 split into webdataset shards.")
    parser.add_argument("--builder", required=True, help="builder name, e.g. coco_caption or vqav2")
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cfg-path", help="a YAML file with a datasets.<builder> section")
    parser.add_argument("--options", nargs="*", default=[], help="datasets.<builder>.key=value overrides")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar file")
    parser.add_argument("--prefix", help="shard file prefix (default: the split name)")
    args = parser.parse_args(argv)

    cls = registry.get("builder", args.builder, key_path="--builder")
    layers = []
    if dataset_default_path(args.builder).is_file():
        layers.append(read_yaml(dataset_default_path(args.builder)))
    if args.cfg_path:
        layers.append(read_yaml(args.cfg_path))
    layers.append(parse_options(args.options))
    merged = OmegaConf.merge(*layers)
    section = OmegaConf.to_container(merged, resolve=True).get("datasets", {}).get(args.builder, {})
    section["data_type"] = "images"
    builder = cls(section)
    if hasattr(builder, "_derive_build_info"):
        builder._derive_build_info(builder.info_factory)  # the shapes builders generate first
    role = builder.role(args.split)
    records, sample_format, _ = builder.read_records(args.split, role)
    records = builder.capped(records, args.split)
    check_image_files(records, f"{args.builder}/{args.split}")
    pattern = pack_records(records, sample_format, args.out, args.prefix or args.split, args.samples_per_shard)
    print(f"packed {len(records)} {sample_format.name} records of {args.builder}/{args.split}")
    print(f"datasets.{args.builder}.data_type=webdataset; shards of split {args.split}: {pattern}")
    print(pattern)
    return 0


if __name__ == "__main__":
    from lavis.common.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as err:
        print(f"error: {err}")
        raise SystemExit(2) from None

"""The prediction pass of an evaluation: length-bucketed batches, each image encoded once, records in order.

- **Bucketing**: this rank's shard (the same DistributedSampler split as before, so DDP coverage is
  unchanged) is read in windows of ``BUCKET_WINDOW`` batches; inside a window the samples are sorted by
  prompt length (longest first) and cut into batches, so a batch pads its rows on the left to nearly
  one length instead of to the longest prompt of an arbitrary group. Sorting happens in the
  DataLoader workers, with the collation. A few-shot batch holds one shot count, as before.
- **Order**: every batch carries the shard positions of its rows, and the records are put back in shard
  order, so results files are those of an unbucketed pass.
- **Media cache**: a Flamingo model encodes each distinct image once per evaluation run
  (:mod:`lavis.models.flamingo.media_cache`); one cache per model, reused by every split, shot count
  and trial, and dropped as soon as the vision tower's or Perceiver's weights differ.

Streamed (IterableDataset) splits are read in their own order, unbucketed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset

from lavis.datasets.collators import Collator
from lavis.models.flamingo.flamingo import Flamingo
from lavis.models.flamingo.media_cache import MediaCache, media_cache_enabled
from lavis.runners import sample_log
from lavis.runners.data import eval_loader, move_to_device

BUCKET_WINDOW = 8  # batches sorted together: enough to find rows of equal length, few enough to hold in memory
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class WindowCollator:
    """Items of a window -> [(row positions in the window, batch)], rows sorted by prompt length."""

    def __init__(self, collate_fn: Collator, batch_size: int):
        self.collate_fn = collate_fn
        self.batch_size = batch_size

    def __call__(self, items: list) -> list[tuple[list[int], dict]]:
        lengths = self.collate_fn.prompt_lengths(items)
        order = sorted(range(len(items)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [(chunk, self.collate_fn([items[i] for i in chunk])) for chunk in chunks]


def eval_batches(
    dataset, collate_fn, batch_size: int, rank: int, world_size: int, num_workers: int = 0, bucket: bool = True
) -> Iterator[tuple[list[int], dict]]:
    """(shard positions of the rows, batch) for this rank's shard of ``dataset``; see the module docstring."""
    if isinstance(dataset, IterableDataset) or not bucket:
        position = 0
        for batch in eval_loader(dataset, collate_fn, batch_size, rank, world_size, num_workers):
            rows = len(batch["lang_x"])
            yield list(range(position, position + rows)), batch
            position += rows
        return
    if world_size > 1:
        shard = list(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False))
    else:
        shard = list(range(len(dataset)))
    window = batch_size * BUCKET_WINDOW
    loader = DataLoader(
        Subset(dataset, shard),
        batch_size=window,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=WindowCollator(collate_fn, batch_size),
    )
    for start, batches in zip(range(0, len(shard), window), loader):
        for rows, batch in batches:
            yield [start + i for i in rows], batch


def shared_media_cache(model) -> MediaCache:
    """The media cache of ``model`` (one per model object, kept while the model lives)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = MediaCache()
    return cache


def predict_records(
    task,
    model,
    dataset,
    device,
    precision,
    batch_size: int,
    key: str,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    bucket: bool = True,
    cache: bool = True,
) -> list[dict]:
    """``task.valid_step`` records of this rank's shard, in shard order, each annotated with its prompt
    and demonstrations for the per-sample log (``key`` is the dataset's sample id key).

    A Flamingo model gets bucketed batches (``bucket``) and the media cache (``cache``); its task must
    return one record per sample. Any other model is evaluated batch by batch in shard order.
    """
    collate_fn = sample_log.DemoIndexCollator(task.collator(model, "eval"))
    if not isinstance(model, Flamingo):
        records: list[dict] = []
        for batch in eval_loader(dataset, collate_fn, batch_size, rank, world_size, num_workers):
            with precision.autocast():
                records.extend(sample_log.annotate(task.valid_step(model, move_to_device(batch, device)), batch, key))
        return records
    from torch.distributed.fsdp import FSDPModule

    # Under run.strategy=fsdp encoding is a collective (the perceiver's shards are gathered): a cache hit on
    # one rank and a miss on another would leave the ranks in different collectives. No cache there.
    cache = cache and not isinstance(model, FSDPModule)
    scope = media_cache_enabled(model, shared_media_cache(model)) if cache else contextlib.nullcontext()
    placed: dict[int, dict] = {}
    with scope:
        for rows, batch in eval_batches(dataset, collate_fn, batch_size, rank, world_size, num_workers, bucket):
            with precision.autocast():
                records = sample_log.annotate(task.valid_step(model, move_to_device(batch, device)), batch, key)
            if len(records) != len(rows):
                raise RuntimeError(
                    f"{type(task).__name__}.valid_step returned {len(records)} records for a batch "
                    f"of {len(rows)} samples; evaluation needs one record per sample"
                )
            placed.update(zip(rows, records))
    return [placed[i] for i in sorted(placed)]

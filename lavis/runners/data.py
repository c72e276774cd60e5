"""Data loaders of the runner: a resumable training stream and sharded evaluation loaders.

The training order is a pure function of (seed, data epoch, rank, world size): a
DistributedSampler (also with one process), or with ``run.group_by_length`` a
LengthGroupedSampler, shuffles with its own generator, and the DataLoader gets its own
generator too, so creating a loader never draws from the global torch RNG. A resumed run
rebuilds the epoch's order and skips the
micro-batches already consumed, replaying the rest of the epoch exactly.

An IterableDataset (webdataset shards, ``lavis.datasets.shards.ShardDataset``)
partitions itself by rank and orders itself by epoch: it gets no sampler, its
``set_epoch(data_epoch)`` is called before each epoch, and a resumed run drops the
consumed micro-batches from the front of the epoch's stream (they are read again,
since a stream cannot seek, but the rest of the epoch is the same). With DataLoader workers a
stream splits its rank's records among them in contiguous shares, each batched on its own.
(With ``num_workers`` > 0, random augmentations drawn inside workers restart their
worker seeds on resume; only with ``num_workers: 0``, where they draw from the
restored main-process RNG, is the rest of the epoch bitwise identical.)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from lavis.common.errors import ConfigError
from lavis.datasets.shards import rank_range


class SkipSampler(Sampler):
    """The indices of ``base`` after the first ``skip`` ones (the part of an epoch not yet consumed)."""

    def __init__(self, base: Sampler, skip: int = 0):
        self.base = base
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.base):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class LengthGroupedSampler(Sampler):
    """This rank's indices for one epoch, with the samples of each optimizer step of similar size.

    Padding to the longest row wastes the compute of every shorter one: with 0..4 demonstrations per
    sample, 44% of a batch's tokens (and images) were padding. Here the epoch's random permutation
    (``seed + epoch``, like DistributedSampler's) is cut into windows of ``WINDOW`` steps; a window is
    sorted by size (stable, so equal sizes stay in random order) and cut into the global batches of its
    steps (``step_batch`` = batch x processes x accumulation), and the epoch's steps are shuffled. A step's
    global batch is then the same set of samples for any split of it over processes and micro-batches
    (rank ``r`` takes items ``r, r + W, ...`` of each, as DistributedSampler does of the permutation), so
    1 process x 16 and 2 x 8 still train the same. Samples that cannot fill a step are dropped.
    """

    WINDOW = 50  # steps per sorted window: wider groups better, narrower keeps steps more random

    def __init__(self, sizes: list[int], step_batch: int, rank: int, world_size: int, seed: int):
        self.sizes = sizes
        self.step_batch = step_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def step_batches(self) -> list[list[int]]:
        """The epoch's global batches, one per optimizer step, in training order."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        usable = self.usable()
        order = torch.randperm(len(self.sizes), generator=generator)[:usable].tolist()
        window = self.step_batch * self.WINDOW
        steps = []
        for start in range(0, usable, window):
            ranked = sorted(order[start : start + window], key=self.sizes.__getitem__)
            steps += [ranked[i : i + self.step_batch] for i in range(0, len(ranked), self.step_batch)]
        return [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]

    def __iter__(self) -> Iterator[int]:
        for step in self.step_batches():
            yield from step[self.rank :: self.world_size]

    def usable(self) -> int:
        """The samples of an epoch that fill whole steps."""
        return len(self.sizes) - len(self.sizes) % self.step_batch

    def __len__(self) -> int:
        return self.usable() // self.world_size


def stream_batches(records: int, batch_size: int, num_workers: int) -> int:
    """Full batches an epoch of ``records`` streamed records gives: each DataLoader worker batches its own
    contiguous share (``ShardDataset.worker_positions``) and drops its last partial batch."""
    shares = max(1, num_workers)  # no worker: the main process batches all of them
    return sum((hi - lo) // batch_size for lo, hi in (rank_range(records, w, shares) for w in range(shares)))


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers per rank: ``run.num_workers``, or where it is null, 0 on the CPU (workers would take
    the cores the step computes on) and on a GPU this rank's share of the CPUs less one (1 to 8), so that
    decoding and collation run beside the step instead of between steps."""
    if requested is not None:
        return int(requested)
    if device.type != "cuda":
        return 0
    per_rank = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, per_rank - 1))


def concat_train_datasets(datasets: dict, splits: list[str]) -> Dataset:
    """One training dataset from every ``datasets[name][split]`` with ``split`` in ``splits``."""
    parts = [by_split[split] for by_split in datasets.values() for split in splits if split in by_split]
    if not parts:
        available = sorted({f"{name}.{split}" for name, by_split in datasets.items() for split in by_split})
        raise ConfigError(f"run.train_splits: no dataset has a split in {list(splits)}; available: {available}")
    if len(parts) > 1 and any(isinstance(part, IterableDataset) for part in parts):
        # ConcatDataset refuses streams, and chaining them would make the epoch length and order ill-defined.
        names = [f"{name}.{split}" for name, by_split in datasets.items() for split in splits if split in by_split]
        raise ConfigError(
            f"run.train_splits: {names} include a streamed (webdataset) split, which cannot be concatenated "
            f"with other splits; pack them into one set of shards or train on one split"
        )
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def leaf_datasets(dataset: Dataset) -> list[Dataset]:
    """The datasets a ConcatDataset is made of (or the dataset itself)."""
    if isinstance(dataset, ConcatDataset):
        return [leaf for part in dataset.datasets for leaf in leaf_datasets(part)]
    return [dataset]


def image_counts(dataset: Dataset) -> list[int]:
    """The images of each item of a (concatenated) training dataset, in index order."""
    return [n for leaf in leaf_datasets(dataset) for n in leaf.image_counts()]


class TrainStream:
    """Groups of ``accum`` micro-batches, one per optimizer step, across data epochs.

    A data epoch yields ``steps_per_epoch = len(loader) // accum`` steps; the trailing
    micro-batches that cannot fill a step are dropped, so every step averages the same
    number of samples. ``position`` counts micro-batches consumed in ``data_epoch``.
    """

    def __init__(
        self,
        dataset: Dataset,
        collate_fn,
        batch_size: int,
        accum: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        group_by_length: bool = False,
    ):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.accum = accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.data_epoch = 0
        self.position = 0
        self._iter = None
        self.streamed = isinstance(dataset, IterableDataset)
        if group_by_length and self.streamed:
            raise ConfigError(
                "run.group_by_length: a streamed (webdataset) split cannot be grouped (its order is the shards'); "
                "set it to false"
            )
        self.sizes = image_counts(dataset) if group_by_length else None
        if self.streamed and world_size > 1 and dataset.uneven != "pad":
            # Ranks with different epoch lengths would stop at different steps and hang in a collective.
            raise ConfigError(
                "datasets.<name>.webdataset.uneven: training on shards under DDP needs 'pad' (every rank "
                f"the same number of samples per epoch), got {dataset.uneven!r}"
            )
        # A stream's len() is what this rank yields per epoch (ShardDataset pads ranks to equal lengths).
        if self.streamed:
            self.batches_per_epoch = stream_batches(len(dataset), batch_size, num_workers)
        else:
            self.batches_per_epoch = len(self._sampler(0)) // batch_size
        self.steps_per_epoch = self.batches_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"run.batch_size_train={batch_size} x run.accum_grad_iters={accum} x {world_size} process(es) "
                f"needs more samples than the training data has ({len(dataset)}); lower them"
            )

    def _sampler(self, epoch: int) -> Sampler:
        if self.sizes is not None:
            step_batch = self.batch_size * self.world_size * self.accum
            sampler = LengthGroupedSampler(self.sizes, step_batch, self.rank, self.world_size, self.seed)
        else:
            sampler = DistributedSampler(
                self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=True
            )
        sampler.set_epoch(epoch)
        return sampler

    def _loader_options(self) -> dict:
        # Workers (when asked for) keep batches queued ahead of the step; each data epoch starts its own.
        if self.num_workers == 0:
            return {"num_workers": 0, "pin_memory": self.pin_memory}
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory, "prefetch_factor": 4}

    def _open_epoch(self) -> None:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.data_epoch * 1009 + self.rank)
        if self.streamed:
            self._iter = self._open_stream(generator)
            return
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=SkipSampler(self._sampler(self.data_epoch), self.position * self.batch_size),
            collate_fn=self.collate_fn,
            drop_last=True,
            generator=generator,
            **self._loader_options(),
        )
        self._iter = iter(loader)

    def _open_stream(self, generator: torch.Generator) -> Iterator:
        # The stream orders and partitions itself; DataLoader refuses a sampler for an IterableDataset.
        self.dataset.set_epoch(self.data_epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            drop_last=True,
            generator=generator,
            **self._loader_options(),
        )
        return itertools.islice(iter(loader), self.position, None)

    def seek(self, data_epoch: int, position: int) -> None:
        """Continue from micro-batch ``position`` of ``data_epoch`` (used on resume)."""
        self.data_epoch, self.position, self._iter = data_epoch, position, None

    def next_step(self) -> list:
        """The micro-batches of the next optimizer step."""
        if self.position + self.accum > self.steps_per_epoch * self.accum:
            self.data_epoch, self.position, self._iter = self.data_epoch + 1, 0, None
        if self._iter is None:
            self._open_epoch()
        micro_batches = [next(self._iter) for _ in range(self.accum)]
        self.position += self.accum
        return micro_batches

    def state(self) -> dict:
        return {"data_epoch": self.data_epoch, "position": self.position}


def eval_loader(
    dataset: Dataset, collate_fn, batch_size: int, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    """A loader over this rank's shard of ``dataset`` in a fixed order.

    With several ranks the DistributedSampler pads the last shard with repeats;
    the gathered records are de-duplicated by sample id afterwards. An
    IterableDataset (webdataset shards) splits itself by rank (``uneven: pad``
    repeats up to world-1 records, de-duplicated the same way) and gets no sampler.
    """
    sampler = None
    if isinstance(dataset, IterableDataset):
        dataset.set_epoch(0)  # evaluation reads every epoch's records in the unshuffled order
    elif world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=False,
    )


def move_to_device(batch, device: torch.device):
    """Tensors of a (nested) batch moved to ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch

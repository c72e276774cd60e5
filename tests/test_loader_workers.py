"""run.num_workers: an explicit count is kept; null picks 0 on the CPU and the rank's CPUs less one on a GPU.
A stream batched by several workers gives the number of steps the runner counts on."""

import os

import pytest
import torch
from torch.utils.data import IterableDataset

from lavis.datasets.samples import SplitDataset
from lavis.datasets.shards import rank_range
from lavis.runners.data import TrainStream, loader_workers
from lavis.runners.run_config import RunConfig


def test_an_explicit_count_is_kept_on_any_device():
    assert loader_workers(0, torch.device("cuda", 0)) == 0
    assert loader_workers(3, torch.device("cpu")) == 3


def test_null_is_no_worker_on_the_cpu():
    assert RunConfig().num_workers is None
    assert loader_workers(None, torch.device("cpu")) == 0


@pytest.mark.parametrize(("cpus", "local_ranks", "expected"), [(16, 2, 7), (16, 1, 8), (4, 4, 1), (2, 1, 1)])
def test_null_on_a_gpu_takes_the_rank_share_of_the_cpus_less_one(monkeypatch, cpus, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert loader_workers(None, torch.device("cuda", 0)) == expected


def test_a_negative_count_is_a_config_problem():
    assert RunConfig(num_workers=-1).validate("run") == ["run.num_workers: must be >= 0 or null, got -1"]


class WorkerSharedStream(SplitDataset, IterableDataset):
    """``n`` records split among DataLoader workers in contiguous shares, as ShardDataset splits them."""

    sample_id_key = "i"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def sample_ids(self):
        return list(range(self.n))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        lo, hi = (0, self.n) if info is None else rank_range(self.n, info.id, info.num_workers)
        return iter(range(lo, hi))


@pytest.mark.parametrize("workers", [0, 2])  # this machine suggests at most 2
def test_a_stream_over_workers_fills_every_counted_step(workers):
    stream = TrainStream(
        WorkerSharedStream(10), list, batch_size=3, accum=1, rank=0, world_size=1, seed=0, num_workers=workers
    )
    # 10 records: the main process makes 3 full batches of 3; 2 workers 5 + 5 records -> 1 + 1.
    assert stream.steps_per_epoch == {0: 3, 2: 2}[workers]
    seen = [i for _ in range(2 * stream.steps_per_epoch) for micro_batch in stream.next_step() for i in micro_batch]
    assert len(seen) == 2 * 3 * stream.steps_per_epoch

"""run.num_workers: an explicit count is kept; null picks 0 on the CPU and the rank's CPUs less one on a GPU."""

import os

import pytest
import torch

from lavis.runners.data import loader_workers
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

"""Gather / de-duplicate / coverage helpers, and the single-process behaviour of lavis.common.dist."""

import pytest
import torch

from lavis.common import dist
from lavis.common.errors import DataError


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    dist.barrier()  # returns at once: nothing to wait for
    assert dist.gather_records([{"id": 1}]) == [{"id": 1}]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.any_rank(True) and not dist.any_rank(False)
    t = torch.tensor([2.0])
    assert dist.all_reduce_mean(t) is t


def test_dedup_keeps_first_record_per_id_in_linear_time():
    records = [{"id": i % 1000, "n": i} for i in range(3000)]
    unique = dist.dedup_records(records, "id")
    assert [r["n"] for r in unique] == list(range(1000))


def test_dedup_names_a_record_without_the_id_key():
    with pytest.raises(DataError, match=r"evaluation record #1 has no sample id key 'question_id'"):
        dist.dedup_records([{"question_id": 1}, {"image_id": 2}], "question_id")


def test_coverage_accepts_exact_cover_and_lists_missing_extra_and_repeated():
    dist.check_coverage([{"id": 3}, {"id": 1}, {"id": 2}], "id", [1, 2, 3], "coco.val")
    with pytest.raises(DataError) as err:
        dist.check_coverage([{"id": 1}, {"id": 1}, {"id": 9}], "id", range(1, 9), "vqav2.val")
    message = str(err.value)
    assert message.startswith("vqav2.val: evaluation records do not cover the split exactly once by 'id'")
    assert "7 missing (e.g. [2, 3, 4, 5, 6])" in message
    assert "1 not in the dataset (e.g. [9])" in message and "1 repeated (e.g. [1])" in message


def test_cuda_request_without_cuda_is_a_config_error(monkeypatch):
    from lavis.common.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="run.device: cuda was requested but no CUDA device"):
        dist.resolve_device("cuda")
    assert dist.resolve_device("auto") == torch.device("cpu")

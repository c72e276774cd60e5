"""Distributed evaluation of one split: shard, predict, gather, de-duplicate, check, score.

Every rank runs ``task.valid_step`` on its shard with the unwrapped model; rank 0
collects the records in memory, de-duplicates them by the task's sample id,
checks that they cover ``dataset.sample_ids()`` exactly, and calls
``task.evaluate``. The metrics (or the error) are broadcast, so every rank returns
the same dict or raises the same error instead of waiting on a collective (rank 0
re-raises a bug in ``task.evaluate`` itself, with its traceback; the others raise
``_RemoteError``).
"""

from __future__ import annotations

import torch

from lavis.common import dist
from lavis.common.errors import UserError
from lavis.common.logging import get_logger
from lavis.runners import sample_log
from lavis.runners.eval_batches import predict_records

log = get_logger()


class _RemoteError(Exception):
    pass


@torch.no_grad()
def evaluate_split(
    *,
    task,
    model,
    dataset,
    dataset_name: str,
    split: str,
    dist_info,
    precision,
    batch_size: int,
    num_workers: int = 0,
    samples_path=None,
    result_dir=None,
) -> dict:
    """The metrics of ``task.evaluate`` for one split, identical on every rank.

    With ``samples_path``, rank 0 also writes the per-sample log there (lavis/runners/sample_log.py).
    """
    # A joint task evaluates datasets of several kinds; each dataset knows its own sample id.
    key = dataset.sample_id_key
    was_training = model.training
    model.eval()
    try:
        records = predict_records(
            task,
            model,
            dataset,
            dist_info.device,
            precision,
            batch_size,
            key,
            dist_info.rank,
            dist_info.world_size,
            num_workers,
        )
    finally:
        model.train(was_training)

    gathered = dist.gather_records(records)
    outcome: dict
    local_error: Exception | None = None
    if dist_info.is_main:
        try:
            unique = dist.dedup_records(gathered, key)
            dist.check_coverage(unique, key, dataset.sample_ids(), where=f"{dataset_name}.{split}")
            metrics = task.evaluate(unique, split, dataset, result_dir)
            if not isinstance(metrics, dict) or "agg_metrics" not in metrics:
                raise TypeError(
                    f"{type(task).__name__}.evaluate must return a dict with 'agg_metrics', got {metrics!r}"
                )
            _write_samples(samples_path, unique, key, sample_log.pop_samples(metrics), dataset)
            outcome = {"metrics": {k: _plain(v) for k, v in metrics.items()}}
        except UserError as err:
            outcome = {"error": err}
        except Exception as err:  # noqa: BLE001 - re-raised below, on rank 0 as itself
            if not dist_info.distributed:
                raise
            # The other ranks wait on the broadcast, so they get a summary; rank 0 logs the traceback
            # and re-raises the original exception (its traceback intact) once they have it.
            log.exception("rank 0 failed to score %s.%s", dataset_name, split)
            local_error = err
            outcome = {"error": _RemoteError(f"rank 0 failed to score {dataset_name}.{split}: {err!r}")}
    else:
        outcome = {}
    outcome = dist.broadcast_object(outcome)
    if local_error is not None:
        raise local_error
    if "error" in outcome:
        raise outcome["error"]
    return outcome["metrics"]


def _write_samples(path, records: list[dict], key: str, per_sample: dict, dataset) -> None:
    """The per-sample log of a scored split; a failure is a warning: the metrics are what the run is for."""
    if path is None:
        return
    try:
        sample_log.write_samples(path, sample_log.build_samples(records, key, per_sample, dataset))
    except Exception:  # noqa: BLE001 - logged with its traceback
        log.exception("could not write the per-sample log %s", path)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value

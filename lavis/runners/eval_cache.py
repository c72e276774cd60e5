"""The response cache of a few-shot evaluation: finished work survives a kill, a re-run continues.

Two kinds of entries, both in ``<run dir>/response_cache/``, appended as JSON lines and fsynced before the
evaluation moves on (write-ahead: what is in the file is done; a line cut by a kill is ignored):

- ``records.rank<r>.jsonl``: the task's records of every finished batch, one line per sample, keyed by
  :func:`row_key` = sha256 of (evaluation fingerprint, data set, split tag, sample id, the exact prompt,
  the demonstrations' pool indices). The fingerprint covers the model and checkpoint fingerprints, the
  task's resolved config and the decoding settings (:func:`evaluation_fingerprint`).
- ``cells.jsonl`` (rank 0): the metrics of every finished (data set, split, shots, trial) cell, written once
  its samples file is on disk, so a re-run skips the cell without touching the model.

Records go through JSON both when computed and when read back, so a resumed evaluation hands the metric
exactly the same values as an uninterrupted one (byte-identical samples files and metrics).
A SIGTERM sets a flag; the next batch boundary (agreed by all ranks) raises :class:`EvaluationInterrupted`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lavis.common import dist

CACHE_DIR = "response_cache"
SCHEMA_VERSION = 1
# run keys that change what is evaluated or how the run is kept, not any single response.
_BOOKKEEPING_KEYS = (
    "output_dir",
    "run_name",
    "num_shots",
    "num_trials",
    "trial_seeds",
    "num_samples",
    "num_workers",
    "dist_timeout_s",
    "resume_ckpt_path",
    "rices_cache_dir",
    "evaluate",
    "device",
)


class EvaluationInterrupted(Exception):
    """SIGTERM: the finished batches are in the cache; re-running the same command continues."""


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def task_config(cfg) -> dict:
    """The parts of the resolved config that decide a response: datasets, and run minus bookkeeping keys."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    run = {k: v for k, v in (plain.get("run") or {}).items() if k not in _BOOKKEEPING_KEYS}
    return {"run": run, "datasets": plain.get("datasets") or {}}


def evaluation_fingerprint(model_fingerprint: str, checkpoint_fingerprint: str | None, cfg) -> str:
    """What every cached response depends on besides its own sample and prompt."""
    return sha256_json(
        {
            "schema": SCHEMA_VERSION,
            "model": model_fingerprint,
            "checkpoint": checkpoint_fingerprint,
            "task": task_config(cfg),
        }
    )


def row_key(fingerprint: str, dataset: str, tag: str, sample_id, prompt: str | None, demo_indices) -> str:
    """The cache key of one sample's response."""
    return sha256_json([fingerprint, dataset, tag, sample_id, prompt, list(demo_indices or [])])


def cell_key(fingerprint: str, dataset: str, tag: str, sample_ids: list) -> str:
    """The cache key of a finished cell (its queries included, so another ``num_samples`` is another cell)."""
    return sha256_json([fingerprint, dataset, tag, sha256_json(sample_ids)])


def _read_lines(path: Path) -> list[dict]:
    entries = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # cut by a kill mid-write: not done
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return entries


def as_json(obj):
    """``obj`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(obj))


class ResponseCache:
    """The records and cells of one evaluation run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int = 0):
        self.dir = Path(run_dir) / CACHE_DIR
        self.rank = rank
        self.records: dict[str, dict] = {}
        self.cells: dict[str, dict] = {}
        self.hits = 0
        self._record_file = None
        self._cell_file = None

    def load(self) -> ResponseCache:
        """Read every rank's records (the world size may have changed) and the finished cells."""
        if self.dir.is_dir():
            for path in sorted(self.dir.glob("records.rank*.jsonl")):
                for entry in _read_lines(path):
                    self.records[entry["key"]] = entry["record"]
            if (self.dir / "cells.jsonl").is_file():
                for entry in _read_lines(self.dir / "cells.jsonl"):
                    self.cells[entry["key"]] = entry["metrics"]
        return self

    def _append(self, attr: str, name: str, lines: list[dict]) -> None:
        handle = getattr(self, attr)
        if handle is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / name
            handle = open(path, "a", encoding="utf-8")
            if path.stat().st_size:  # a previous run was killed mid-line: start on a fresh line
                with open(path, "rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        handle.write("\n")
            setattr(self, attr, handle)
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())

    def get(self, key: str) -> dict | None:
        """The cached record of ``key`` (a copy), or None."""
        record = self.records.get(key)
        if record is not None:
            self.hits += 1
            return json.loads(json.dumps(record))
        return None

    def put(self, items: list[tuple[str, dict]]) -> None:
        """Append records, fsynced before returning."""
        self._append("_record_file", f"records.rank{self.rank}.jsonl", [{"key": k, "record": r} for k, r in items])
        self.records.update(items)

    def cell(self, key: str) -> dict | None:
        """The metrics of a finished cell, or None."""
        return self.cells.get(key)

    def put_cell(self, key: str, metrics: dict) -> None:
        """Record a finished cell (rank 0), fsynced."""
        self._append("_cell_file", "cells.jsonl", [{"key": key, "metrics": metrics}])
        self.cells[key] = metrics

    def close(self) -> None:
        """Close the files (everything written is already on disk)."""
        for attr in ("_record_file", "_cell_file"):
            if getattr(self, attr) is not None:
                getattr(self, attr).close()
                setattr(self, attr, None)


class StopFlag:
    """SIGTERM -> a flag that every rank checks at batch or step boundaries (:func:`dist.any_rank`)."""

    def __init__(self):
        self.requested = False
        self._restore = None

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._restore = lambda: signal.signal(signal.SIGTERM, previous)
        return self

    def _on_sigterm(self, signum, frame):
        self.requested = True  # only a flag: the batch or step in flight finishes and is saved first

    def check(self) -> None:
        """Raise EvaluationInterrupted on every rank once any rank got SIGTERM."""
        if dist.any_rank(self.requested):
            raise EvaluationInterrupted()

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


class CachedTask:
    """A task whose ``valid_step`` answers from the cache and stores what it computes (one cell's view).

    The rest of what evaluation uses (collator, evaluate, sample_id_key) is the wrapped task's. A batch is
    computed only when one of its rows is missing.
    """

    def __init__(self, task, cache: ResponseCache, fingerprint: str, dataset: str, tag: str, key: str, stop: StopFlag):
        self._task, self._cache, self._stop = task, cache, stop
        self._fingerprint, self._dataset, self._tag, self._key = fingerprint, dataset, tag, key

    # What evaluation asks of a task besides valid_step: the wrapped task's own.
    @property
    def sample_id_key(self) -> str:
        return self._task.sample_id_key

    def collator(self, model, role: str):
        return self._task.collator(model, role)

    def evaluate(self, records: list[dict], split: str, dataset, result_dir) -> dict:
        return self._task.evaluate(records, split, dataset, result_dir)

    def _row_keys(self, batch: dict) -> dict:
        ids = batch[self._key]
        prompts = batch.get("prompt") or [None] * len(ids)
        demos = batch.get("demo_indices") or [[]] * len(ids)
        return {
            sample_id: row_key(self._fingerprint, self._dataset, self._tag, sample_id, prompt, demo)
            for sample_id, prompt, demo in zip(ids, prompts, demos)
        }

    def valid_step(self, model, batch) -> list[dict]:
        """The batch's records, from the cache when every row is there."""
        self._stop.check()
        keys = self._row_keys(batch)
        cached = [self._cache.get(k) for k in keys.values()]
        if all(r is not None for r in cached):
            return cached
        records = as_json(self._task.valid_step(model, batch))
        self._cache.put([(keys[r[self._key]], r) for r in records])
        return records

"""What a run directory holds, read once for the report: config, provenance, metrics, few-shot table, samples.

Every file but the run directory itself is optional: a run that died early, or one written before
``run_info.json`` existed, still gets a report of what it has.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lavis.common.errors import DataError
from lavis.common.fileio import read_json
from lavis.runners.sample_log import parse_samples_filename

# metrics.jsonl keys that place a record rather than measure something.
PLACE_KEYS = ("epoch", "step", "split", "dataset", "shots", "trial", "seed", "num_queries")


@dataclass(frozen=True)
class SampleFile:
    """One ``samples_*.jsonl`` of the run and where it belongs."""

    path: Path
    dataset: str
    tag: str
    split: str
    shots: int | None = None
    trial: int | None = None
    step: int | None = None

    @property
    def group(self) -> str:
        """The gallery it belongs to: ``dataset/split`` plus the shot count (trials share a gallery)."""
        shots = f" {self.shots}-shot" if self.shots is not None else ""
        return f"{self.dataset}/{self.split}{shots}"


@dataclass
class RunData:
    """The parsed contents of one run directory."""

    run_dir: Path
    config: dict = field(default_factory=dict)
    run_info: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    fewshot_table: dict | None = None
    sample_files: list[SampleFile] = field(default_factory=list)
    wall_time_s: float | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def train_records(self) -> list[dict]:
        """metrics.jsonl lines of the training loop (split ``train``)."""
        return [m for m in self.metrics if m.get("split") == "train" and "shots" not in m]

    @property
    def eval_records(self) -> list[dict]:
        """metrics.jsonl lines of evaluations during training (a split other than train, no shots)."""
        return [
            m for m in self.metrics if m.get("split") not in (None, "train") and "shots" not in m and "agg_metrics" in m
        ]

    def galleries(self) -> dict[str, list[SampleFile]]:
        """``{group: [sample files]}``; a training run's groups hold only each split's last evaluation."""
        groups: dict[str, list[SampleFile]] = {}
        for sample_file in self.sample_files:
            groups.setdefault(sample_file.group, []).append(sample_file)
        for group, files in groups.items():
            stepped = [f for f in files if f.step is not None]
            if stepped:
                last = max(f.step for f in stepped)
                groups[group] = [f for f in stepped if f.step == last]
            groups[group].sort(key=lambda f: (f.trial or 0, f.tag))
        return dict(sorted(groups.items(), key=lambda kv: (kv[1][0].dataset, kv[1][0].split, kv[1][0].shots or 0)))

    def agg_metric_name(self) -> str | None:
        """The per-sample key that agrees with ``agg_metrics``: ``run.agg_metric`` of the config."""
        return (self.config.get("run") or {}).get("agg_metric")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a run killed mid-write leaves at most a partial last line
            if isinstance(record, dict):
                records.append(record)
    return records


def _timestamp(value) -> float | None:
    """Seconds since the epoch of a number or an ISO 8601 time (run_info.json writes ``%Y-%m-%dT%H:%M:%S%z``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        for parse in (datetime.datetime.fromisoformat, lambda v: datetime.datetime.strptime(v, "%Y-%m-%dT%H:%M:%S%z")):
            try:
                return parse(value).timestamp()
            except ValueError:
                continue
    return None


def _wall_time(run_dir: Path, run_info: dict | None) -> float | None:
    """Seconds from the run's start to its end (run_info.json's times, else the files' times)."""
    info = run_info or {}
    summary = info.get("summary") if isinstance(info.get("summary"), dict) else {}
    for value in (info.get("wall_time_s"), summary.get("wall_time_s")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    start, end = _timestamp(info.get("start_time")), _timestamp(info.get("end_time"))
    if start is not None and end is not None:
        return end - start
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    newest = max((p.stat().st_mtime for p in run_dir.iterdir() if p.is_file()), default=time.time())
    return newest - config.stat().st_mtime


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read ``run_dir`` (DataError when it is not a run directory)."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    markers = ("config.yaml", "metrics.jsonl", "fewshot_table.json")
    if not any((run_dir / m).is_file() for m in markers) and not any(run_dir.glob("samples_*.jsonl")):
        raise DataError(f"{run_dir} is not a run directory: it has none of {', '.join(markers)} or samples_*.jsonl")
    data = RunData(run_dir)
    if (run_dir / "config.yaml").is_file():
        try:
            data.config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise DataError(f"{run_dir / 'config.yaml'}: not valid YAML: {err}") from None
    if (run_dir / "run_info.json").is_file():
        data.run_info = read_json(run_dir / "run_info.json", "run_info.json")
    if (run_dir / "metrics.jsonl").is_file():
        data.metrics = _read_jsonl(run_dir / "metrics.jsonl")
    if (run_dir / "fewshot_table.json").is_file():
        data.fewshot_table = read_json(run_dir / "fewshot_table.json", "few-shot table")
    datasets = list((data.config.get("datasets") or {}).keys())
    datasets += sorted({m["dataset"] for m in data.metrics if isinstance(m.get("dataset"), str)} - set(datasets))
    for path in sorted(run_dir.glob("samples_*.jsonl")):
        parsed = parse_samples_filename(path.name, datasets)
        if parsed is not None:
            data.sample_files.append(SampleFile(path=path, **{k: v for k, v in parsed.items()}))
    data.wall_time_s = _wall_time(run_dir, data.run_info)
    return data

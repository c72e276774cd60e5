"""Few-shot evaluation (evaluate.py): every split x shots x trial, then the table of the README.

For each evaluated split the queries are the whole split or ``run.num_samples`` of
it (a fixed seeded subset, the same for every shot count and trial, so that rows
differ only by their demonstrations). Each (shots, trial) pass is an ordinary
distributed evaluation of a :class:`FewShotDataset`; the table reports the mean
and the standard deviation of ``agg_metrics`` over trials.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lavis.common import dist
from lavis.common.errors import ConfigError
from lavis.common.fileio import atomic_write_json, atomic_write_text
from lavis.common.logging import MetricsLog, setup_logging
from lavis.datasets.fewshot import RICES, FewShotDataset
from lavis.report import report_after_run
from lavis.runners import checkpoint as ckpt
from lavis.runners.evaluation import evaluate_split
from lavis.runners.precision import resolve_precision
from lavis.runners.run_dir import prepare_run_dir
from lavis.runners.sample_log import fewshot_tag, samples_filename


class QuerySubset(Dataset):
    """A fixed subset of an evaluation dataset that keeps its scoring attributes."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def sample_ids(self) -> list:
        all_ids = self.dataset.sample_ids()
        return [all_ids[i] for i in self.indices]

    def __getattr__(self, name):
        if name.startswith("__") or name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def query_subset(dataset, num_samples: int | None, seed: int):
    """``num_samples`` queries drawn once with ``seed`` (the whole split when None or larger)."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    if num_samples <= 0:
        raise ConfigError(f"run.num_samples must be positive or null (the whole split), got {num_samples}")
    chosen = np.random.default_rng(seed).choice(len(dataset), size=num_samples, replace=False)
    return QuerySubset(dataset, sorted(int(i) for i in chosen))


def check_run(run, datasets) -> list[str]:
    """The splits to evaluate, after checking the run section against the built datasets (ConfigError)."""
    if run.num_trials < 1 or len(run.trial_seeds) < run.num_trials:
        raise ConfigError(
            f"run.trial_seeds: {run.num_trials} trial(s) need as many seeds, got {list(run.trial_seeds)}"
        )
    splits = list(run.test_splits or run.valid_splits)
    if not splits:
        raise ConfigError("run.test_splits (or run.valid_splits): name the split(s) to evaluate")
    for name, by_split in datasets.items():
        for split in [*splits, run.demo_split]:
            if split not in by_split:
                raise ConfigError(
                    f"datasets.{name}: has no split {split!r} (needed by run.test_splits / run.demo_split); "
                    f"it has {', '.join(sorted(by_split))}"
                )
        for split in splits:
            _check_scorable(by_split[split], name, split)
    return splits


def _check_scorable(dataset, name: str, split: str) -> None:
    """A caption split is scored against its ground-truth file: refuse one built without it, before generating.

    (A VQA split without answers, test-dev, is legitimately unscored: its results file is the submission.)
    """
    sample_format = getattr(dataset, "sample_format", None)
    if getattr(sample_format, "name", None) == "caption_eval" and dataset.annotation_file is None:
        raise ConfigError(
            f"datasets.{name}.build_info.annotations.{split}: split {split!r} is evaluated (run.test_splits / "
            f"run.valid_splits) but has no ground-truth captions file to score it (e.g. captions_val2014.json); "
            "only a demo pool (run.demo_split) may go without one"
        )


def rices_features(model, images: torch.Tensor, device) -> torch.Tensor:
    """The CLIP image embedding (pooled and projected) of a batch, float32, as OpenFlamingo's RICES uses.

    The batch is cast to the tower's dtype: with a half-precision frozen_dtype the tower refuses float32 input.
    """
    dtype = next(model.vision_encoder.parameters()).dtype
    with torch.no_grad():
        return model.vision_encoder(images.to(device=device, dtype=dtype)).float()


def _rices_index(run, model, pool, name: str, run_dir: Path, device, model_label: str):
    if run.demo_method != "rices":
        return None
    cache_dir = Path(run.rices_cache_dir) if run.rices_cache_dir else run_dir / "rices"

    def features(images: torch.Tensor) -> torch.Tensor:
        return rices_features(model, images, device)

    # The label keys the feature cache, so another model or checkpoint never reuses stale features.
    return RICES(pool, features, cache_dir / f"{name}_{run.demo_split}.pt", batch_size=run.batch_size_eval,
                 feature_name=model_label)


def run_fewshot_evaluation(cfg, task, model, datasets, checkpoint: str | None = None) -> dict:
    """Evaluate every configured split, shot count and trial; write and print the table."""
    run = cfg.run
    splits = check_run(run, datasets)
    info = dist.init_distributed(run.device, run.dist_timeout_s)
    precision = resolve_precision(run.amp, info.device)
    paths = prepare_run_dir(run, cfg)
    setup_logging(info.rank, paths.log)
    if checkpoint:
        state = ckpt.load_checkpoint(checkpoint)
        ckpt.load_trainable_state_dict(model, state.get("model", state), str(checkpoint))
    model.to(info.device).eval()
    task.result_dir = paths.results
    label = str(checkpoint) if checkpoint else f"{cfg.model.arch}/{cfg.model.model_type} (pretrained)"
    metrics_log = MetricsLog(paths.metrics, enabled=info.is_main)
    try:
        table = _evaluate_all(run, task, model, datasets, splits, info, precision, paths, label, metrics_log)
    finally:
        metrics_log.close()
    if info.is_main:
        write_table(table, paths.run_dir)
        print(format_table(table))
        print(f"few-shot results written to {paths.run_dir}")
        report_after_run(paths.run_dir, "evaluated")  # a warning, never an error, when it fails
    return table


def _evaluate_all(run, task, model, datasets, splits, info, precision, paths, label, metrics_log) -> dict:
    """The table: for every dataset and split, agg_metrics over trials per shot count."""
    table: dict = {"model": label, "metric": "agg_metrics", "rows": {}}
    for name, by_split in datasets.items():
        pool = by_split[run.demo_split]
        rices = _rices_index(run, model, pool, name, paths.run_dir, info.device, label)
        for split in splits:
            queries = query_subset(by_split[split], run.num_samples, run.trial_seeds[0])
            row = {}
            for shots in run.num_shots:
                scores = []
                for trial in range(run.num_trials):
                    fewshot = FewShotDataset(
                        queries, pool, num_shots=shots, seed=run.trial_seeds[trial], trial=trial,
                        method=run.demo_method, zero_shot_text_demos=run.zero_shot_text_demos, rices=rices,
                    )
                    tag = fewshot_tag(split, shots, trial)
                    metrics = evaluate_split(
                        task=task, model=model, dataset=fewshot, dataset_name=name, split=tag, info=info,
                        precision=precision, batch_size=run.batch_size_eval, num_workers=run.num_workers,
                        samples_path=paths.run_dir / samples_filename(name, tag),
                    )
                    metrics_log.write({"dataset": name, "split": split, "shots": shots, "trial": trial,
                                       "seed": run.trial_seeds[trial], "num_queries": len(queries), **metrics})
                    scores.append(metrics["agg_metrics"])
                if None in scores:  # a split without ground truth (VQAv2 test-dev): results files only
                    row[str(shots)] = {"mean": None, "std": None, "trials": scores}
                    continue
                row[str(shots)] = {
                    "mean": statistics.fmean(scores),
                    "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
                    "trials": scores,
                }
            table["rows"][f"{name}/{split}"] = row
    return table


def format_table(table: dict) -> str:
    """Markdown in the style of the original README: rows = model and split, columns = shots, mean ± std."""
    shots = sorted({int(s) for row in table["rows"].values() for s in row})
    header = "| model | data | " + " | ".join(f"{s}-shot" for s in shots) + " |"
    lines = [header, "|" + "---|" * (len(shots) + 2)]
    for data, row in table["rows"].items():
        cells = []
        for s in shots:
            cell = row.get(str(s))
            if cell is None:
                cells.append("")
            elif cell["mean"] is None:
                cells.append("(not scored)")
            else:
                cells.append(f"{cell['mean']:.2f} ± {cell['std']:.2f}")
        lines.append(f"| {table['model']} | {data} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(table: dict, run_dir: Path) -> None:
    """fewshot_table.json and fewshot_table.md in the run directory, each written atomically."""
    atomic_write_json(run_dir / "fewshot_table.json", table, indent=2)
    atomic_write_text(run_dir / "fewshot_table.md", format_table(table) + "\n")

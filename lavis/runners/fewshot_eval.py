"""Few-shot evaluation (evaluate.py): every split x shots x trial, then the table and results.json.

For each evaluated split the queries are the whole split or ``run.num_samples`` of
it (a fixed seeded subset, the same for every shot count and trial, so that rows
differ only by their demonstrations). Each (shots, trial) cell is an ordinary
distributed evaluation of a :class:`FewShotDataset` (padding of the distributed
sampler is de-duplicated before any metric); the table reports the mean and the
standard deviation of ``agg_metrics`` over trials, ``results.json`` adds bootstrap
standard errors and provenance (lavis/runners/eval_results.py).

Resumable: every finished batch and cell is in the run directory's response cache
(lavis/runners/eval_cache.py). Re-running the same command with the same
``run.run_name`` continues that run directory; SIGTERM stops at the next batch
boundary with everything finished saved, and the process exits 0.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lavis.common import dist
from lavis.common.config import run_section
from lavis.common.errors import ConfigError
from lavis.common.fileio import atomic_write_json, atomic_write_text
from lavis.common.logging import format_metrics, get_logger, metric_name
from lavis.datasets.fewshot import RICES, FewShotDataset
from lavis.datasets.samples import DatasetView, check_split_datasets
from lavis.models.trained import checkpoint_fingerprint, load_trained_weights, model_label
from lavis.report import report_after_run
from lavis.runners import eval_cache
from lavis.runners.data import loader_workers
from lavis.runners.eval_results import build_results, cell_summary
from lavis.runners.evaluation import evaluate_split
from lavis.runners.run_dir import RunPaths, prepare_run_dir
from lavis.runners.run_start import open_logs, start_run
from lavis.runners.sample_log import fewshot_tag, samples_filename

log = get_logger()


class QuerySubset(DatasetView):
    """A fixed subset of an evaluation dataset that keeps its scoring attributes."""

    def __init__(self, dataset, indices: list[int]):
        super().__init__(dataset)
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def sample_ids(self) -> list:
        all_ids = self.dataset.sample_ids()
        return [all_ids[i] for i in self.indices]


def query_subset(dataset, num_samples: int | None, seed: int):
    """``num_samples`` (>= 1, FewShotConfig.validate) queries drawn once with ``seed`` (the whole split when None
    or larger)."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    chosen = np.random.default_rng(seed).choice(len(dataset), size=num_samples, replace=False)
    return QuerySubset(dataset, sorted(int(i) for i in chosen))


def splits_to_evaluate(run, datasets) -> list[str]:
    """The splits to evaluate, after checking the run section against the built datasets (ConfigError)."""
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
    sample_format = dataset.sample_format
    if sample_format is not None and sample_format.name == "caption_eval" and dataset.annotation_file is None:
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
    return RICES(
        pool,
        features,
        cache_dir / f"{name}_{run.demo_split}.pt",
        batch_size=run.batch_size_eval,
        feature_name=model_label,
    )


def run_fewshot_evaluation(cfg, task, model, datasets, checkpoint=None) -> dict | None:
    """Evaluate every configured split, shot count and trial; write and print the table and results.json.

    Returns the table, or None when SIGTERM stopped the evaluation (finished work is in the cache).
    """
    # The typed run section (validated by the loader, or here for a config built in code).
    run = run_section(cfg.run, type(task).Config)
    check_split_datasets(datasets)
    splits = splits_to_evaluate(run, datasets)
    fingerprints, fingerprint = evaluation_fingerprints(cfg, checkpoint)
    start = start_run(run, lambda: evaluation_run_dir(run, cfg, fingerprint))
    dist_info, precision, paths = start.dist_info, start.precision, start.paths
    metrics_log = open_logs(start)
    if checkpoint:
        load_trained_weights(model, checkpoint)  # any checkpoint kind: lavis/models/trained.py
    model.to(dist_info.device).eval()
    label = model_label(cfg, checkpoint)
    started = time.time()
    cache = eval_cache.ResponseCache(paths.run_dir, dist_info.rank).load()
    stop = eval_cache.StopFlag().install()
    context = _Context(run, task, model, dist_info, precision, paths, label, metrics_log, cache, stop, fingerprint)
    try:
        table, results_rows, n_samples = _evaluate_all(context, datasets, splits)
    except eval_cache.EvaluationInterrupted:
        log.warning(
            "SIGTERM: the finished batches and cells are saved in %s; re-run the same command (same "
            "run.run_name) to continue",
            paths.run_dir / eval_cache.CACHE_DIR,
        )
        return None
    finally:
        stop.uninstall()
        cache.close()
        metrics_log.close()
    if dist_info.is_main:
        write_table(table, paths.run_dir)
        results = build_results(table["model"], results_rows, n_samples, _plain_config(cfg), fingerprints, started)
        atomic_write_json(paths.run_dir / "results.json", results, indent=2)
        log.info("few-shot table (%s):\n%s", label, format_table(table))  # console and log.txt
        print(f"few-shot results written to {paths.run_dir}")
        report_after_run(paths.run_dir, "evaluated")  # a warning, never an error, when it fails
    return table


def evaluation_fingerprints(cfg, checkpoint) -> tuple[dict, str]:
    """({model_fingerprint, checkpoint_fingerprint}, the evaluation's fingerprint) keying its response cache."""
    fingerprints = {
        "model_fingerprint": eval_cache.sha256_json(_plain_config(cfg.model)),
        "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint) if checkpoint else None,
    }
    return fingerprints, eval_cache.evaluation_fingerprint(
        fingerprints["model_fingerprint"], fingerprints["checkpoint_fingerprint"], cfg
    )


def _plain_config(section) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


def evaluation_run_dir(run, cfg, fingerprint: str) -> RunPaths:
    """The run directory: a fresh one, or the one of ``run.run_name`` when it holds this evaluation's cache.

    A directory of that name whose cache belongs to another evaluation (other model, checkpoint or task
    settings) is a ConfigError, never mixed into.
    """
    outcome = None
    if dist.is_main_process() and run.run_name:
        run_dir = Path(run.output_dir).expanduser().resolve() / run.run_name
        stamp = run_dir / eval_cache.CACHE_DIR / "fingerprint.json"
        if stamp.is_file():
            import json

            found = json.loads(stamp.read_text()).get("fingerprint")
            if found != fingerprint:
                outcome = {
                    "error": ConfigError(
                        f"run.run_name: {run_dir} holds an evaluation of another model, checkpoint or task config "
                        "(its response cache fingerprint differs); choose another run.run_name"
                    )
                }
            else:
                outcome = {"run_dir": str(run_dir)}
                (run_dir / "FAILED").unlink(missing_ok=True)  # a crashed attempt, continued now
    outcome = dist.broadcast_object(outcome)
    if outcome and "error" in outcome:
        raise outcome["error"]
    if outcome:
        log.info("continuing the evaluation in %s", outcome["run_dir"])
        return RunPaths(Path(outcome["run_dir"]), None)
    paths = prepare_run_dir(run, cfg)
    if dist.is_main_process():
        (paths.run_dir / eval_cache.CACHE_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_json(paths.run_dir / eval_cache.CACHE_DIR / "fingerprint.json", {"fingerprint": fingerprint})
    dist.barrier()
    return paths


class _Context:
    """What every cell of one evaluation shares."""

    def __init__(self, run, task, model, dist_info, precision, paths, label, metrics_log, cache, stop, fingerprint):
        self.run, self.task, self.model, self.dist_info, self.precision = run, task, model, dist_info, precision
        self.paths, self.label, self.metrics_log = paths, label, metrics_log
        self.cache, self.stop, self.fingerprint = cache, stop, fingerprint


def _evaluate_all(ctx: _Context, datasets, splits) -> tuple[dict, dict, dict]:
    """(the table: agg_metrics over trials per shot count for every dataset and split, the results.json
    cells (rank 0), n-samples)."""
    run = ctx.run
    table: dict = {"model": ctx.label, "metric": "agg_metrics", "metrics": {}, "rows": {}}
    results: dict = {}
    n_samples: dict = {}
    for name, by_split in datasets.items():
        pool = by_split[run.demo_split]
        rices = _rices_index(run, ctx.model, pool, name, ctx.paths.run_dir, ctx.dist_info.device, ctx.label)
        for split in splits:
            queries = query_subset(by_split[split], run.num_samples, run.trial_seeds[0])
            n_samples[f"{name}/{split}"] = {"original": len(by_split[split]), "effective": len(queries)}
            row, detail = {}, {}
            for shots in run.num_shots:
                trials, files = [], []
                for trial in range(run.num_trials):
                    fewshot = FewShotDataset(
                        queries,
                        pool,
                        num_shots=shots,
                        seed=run.trial_seeds[trial],
                        trial=trial,
                        method=run.demo_method,
                        zero_shot_text_demos=run.zero_shot_text_demos,
                        rices=rices,
                        pool_size=run.demo_pool_size,
                        text_demos_keep_images=ctx.task.text_demos_keep_images,
                    )
                    tag = fewshot_tag(split, shots, trial)
                    files.append(ctx.paths.run_dir / samples_filename(name, tag))
                    metrics = _evaluate_cell(ctx, name, tag, fewshot, files[-1])
                    ctx.metrics_log.write(
                        {
                            "dataset": name,
                            "split": split,
                            "shots": shots,
                            "trial": trial,
                            "seed": run.trial_seeds[trial],
                            "num_queries": len(queries),
                            **metrics,
                        }
                    )
                    trials.append({"trial": trial, "seed": run.trial_seeds[trial], **metrics})
                row[str(shots)] = _table_cell(trials)
                if ctx.dist_info.is_main:
                    detail[str(shots)] = cell_summary(trials, files)
            table["rows"][f"{name}/{split}"] = row
            table["metrics"][f"{name}/{split}"] = metric_name(ctx.run, by_split[split])
            results[f"{name}/{split}"] = detail
    return table, results, n_samples


def _evaluate_cell(ctx: _Context, name: str, tag: str, fewshot, samples_path: Path) -> dict:
    """The metrics of one (dataset, split, shots, trial) cell: from the cache when it finished before."""
    key = eval_cache.cell_key(ctx.fingerprint, name, tag, list(fewshot.sample_ids()))
    done = ctx.cache.cell(key) if ctx.dist_info.is_main and samples_path.is_file() else None
    done = dist.broadcast_object(done)  # rank 0 decides, so every rank skips or runs the same cells
    if done is not None:
        log.info("%s %s: finished in a previous run (response cache)", name, tag)
        return done
    sample_key = fewshot.sample_id_key
    cached = eval_cache.CachedTask(ctx.task, ctx.cache, ctx.fingerprint, name, tag, sample_key, ctx.stop)
    metrics = eval_cache.as_json(
        evaluate_split(
            task=cached,
            model=ctx.model,
            dataset=fewshot,
            dataset_name=name,
            split=tag,
            dist_info=ctx.dist_info,
            precision=ctx.precision,
            batch_size=ctx.run.batch_size_eval,
            num_workers=loader_workers(ctx.run.num_workers, ctx.dist_info.device),
            samples_path=samples_path,
            result_dir=ctx.paths.results,
        )
    )
    log.info("eval %s %s: %s", name, tag, format_metrics(metrics))
    if ctx.dist_info.is_main:
        ctx.cache.put_cell(key, metrics)
    return metrics


def _table_cell(trials: list[dict]) -> dict:
    scores = [t["agg_metrics"] for t in trials]
    if None in scores:  # a split without ground truth (VQAv2 test-dev): results files only
        return {"mean": None, "std": None, "trials": scores}
    return {
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "trials": scores,
    }


def format_table(table: dict) -> str:
    """Markdown in the style of the original README: rows = model and split, columns = shots, mean ± std."""
    shots = sorted({int(s) for row in table["rows"].values() for s in row})
    header = "| model | data (metric) | " + " | ".join(f"{s}-shot" for s in shots) + " |"
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
        metric = table.get("metrics", {}).get(data, table.get("metric", "agg_metrics"))
        lines.append(f"| {table['model']} | {data} ({metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(table: dict, run_dir: Path) -> None:
    """fewshot_table.json and fewshot_table.md in the run directory, each written atomically."""
    atomic_write_json(run_dir / "fewshot_table.json", table, indent=2)
    atomic_write_text(run_dir / "fewshot_table.md", format_table(table) + "\n")

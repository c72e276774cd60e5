"""``results.json`` of a few-shot evaluation, in lmms-eval's spirit: scores, spread, provenance.

Per data set/split and shot count: the mean, population std and per-trial values of ``agg_metrics`` (with
every trial's full metrics), and a bootstrap standard error over samples per trial (from the trial's
``samples_*.jsonl``; 1000 resamples, fixed seed, so re-running gives the same bytes). ``n-samples``:
``original`` (the split) and ``effective`` (queries evaluated). Provenance: the resolved config and its
fingerprint, model and checkpoint fingerprints, git commit, package versions, start and end dates.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from lavis.runners.eval_cache import sha256_json
from lavis.runners.sample_log import read_samples

BOOTSTRAP_ITERS = 1000
BOOTSTRAP_SEED = 1234
# Per-sample score whose mean is the split's metric, in order of preference.
_MEAN_SCORES = ("vqa_accuracy", "top1_correct", "CIDEr")


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) > 1 else float("nan")


def bootstrap_stderr(samples: list[dict]) -> tuple[str, float] | None:
    """(per-sample field, bootstrap standard error of the split's score) or None when no field fits.

    Hateful Memes resamples (label, p_yes) pairs and recomputes the ROC AUC; other tasks resample the
    per-sample score whose mean is the metric (VQA accuracy, top-1, per-image CIDEr as an approximation
    of the corpus CIDEr).
    """
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    # In sample-id order: the file's order depends on how the ranks split the data, the estimate must not.
    samples = sorted(samples, key=lambda s: (type(s.get("doc_id")).__name__, s.get("doc_id")))
    n = len(samples)
    if n < 2:
        return None
    if all("p_yes" in s for s in samples):
        labels = np.asarray([int(s["label"]) for s in samples])
        p_yes = np.asarray([float(s["p_yes"]) for s in samples])
        stats = []
        for _ in range(BOOTSTRAP_ITERS):
            idx = rng.integers(0, n, n)
            stats.append(_auc(labels[idx], p_yes[idx]))
        values = np.asarray([v for v in stats if v == v])
        return ("p_yes", float(np.std(values, ddof=1))) if len(values) > 1 else None
    for field in _MEAN_SCORES:
        if all(isinstance(s.get(field), (int, float)) for s in samples):
            values = np.asarray([float(s[field]) for s in samples])
            means = values[rng.integers(0, n, (BOOTSTRAP_ITERS, n))].mean(axis=1)
            return field, float(np.std(means, ddof=1))
    return None


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (``-dirty`` when it has changes), or None outside a git checkout."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Python and the versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for name in (
        "pet-vlm",
        "torch",
        "transformers",
        "open_clip_torch",
        "peft",
        "pycocoevalcap",
        "nltk",
        "inflection",
        "scikit-learn",
        "numpy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cell_summary(trials: list[dict], sample_files: list[Path]) -> dict:
    """One shot count of one split: mean, std, per-trial values and metrics, bootstrap stderr per trial."""
    scores = [t["agg_metrics"] for t in trials]
    cell: dict = {"trials": scores, "per_trial": trials}
    if None in scores:
        cell.update(mean=None, std=None)
        return cell
    cell["mean"] = statistics.fmean(scores)
    cell["std"] = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    stderrs = []
    for path in sample_files:
        found = bootstrap_stderr(read_samples(path)) if path.is_file() else None
        stderrs.append(found[1] if found else None)
        if found:
            cell["stderr_field"] = found[0]
    cell["stderr_bootstrap"] = stderrs
    return cell


def build_results(model: str, rows: dict, n_samples: dict, config: dict, fingerprints: dict, started: float) -> dict:
    """The results.json object (see the module docstring); ``rows``: ``{dataset/split: {shots: cell_summary}}``."""
    return {
        "results": rows,
        "n-samples": n_samples,
        "n-shot": sorted({int(s) for row in rows.values() for s in row}),
        "metric": "agg_metrics",
        "model": model,
        "config": config,
        "config_fingerprint": sha256_json(config),
        **fingerprints,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "git_hash": git_commit(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "end_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

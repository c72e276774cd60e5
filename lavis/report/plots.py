"""The report's figures with matplotlib (Agg, no display): training curves, eval metrics over steps, few-shot.

Each function returns PNG bytes (or None when the run has nothing to draw); the report embeds them and
writes them to ``RUN_DIR/plots/`` for papers and slides.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never open a window, never need a display

import matplotlib.pyplot as plt  # noqa: E402

from lavis.report.run_data import PLACE_KEYS, RunData  # noqa: E402

# Training scalars drawn first, in this order; any other numeric key of the training lines follows.
TRAIN_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "throughput/samples_per_s",
    "throughput/tokens_per_s",
    "time/step_s",
    "memory/peak_mb",
)
DPI = 110


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def train_scalar_keys(records: Sequence[dict]) -> list[str]:
    """The numeric keys of the training lines, the usual ones first."""
    present = {k for r in records for k, v in r.items() if k not in PLACE_KEYS and _numeric(v)}
    return [k for k in TRAIN_KEYS if k in present] + sorted(present - set(TRAIN_KEYS))


def training_curves(run: RunData) -> bytes | None:
    """One panel per training scalar (loss, learning rate, grad norm, throughput, ...) against the step."""
    records = [r for r in run.train_records if _numeric(r.get("step"))]
    keys = train_scalar_keys(records)
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if _numeric(r.get(key))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"training: {run.name}")
    fig.tight_layout()
    return _png(fig)


def eval_series(run: RunData) -> dict[str, list[tuple[int, float]]]:
    """``{"dataset/split": [(step, agg_metrics), ...]}`` of the evaluations during training."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in run.eval_records:
        if _numeric(r.get("step")) and _numeric(r.get("agg_metrics")):
            series.setdefault(f"{r.get('dataset', '?')}/{r['split']}", []).append((r["step"], r["agg_metrics"]))
    return series


def best_point(points: Sequence[tuple[int, float]], mode: str = "max") -> tuple[int, float]:
    """The (step, value) with the best value (the first of equals, as the runner keeps its first best)."""
    pick = max if mode == "max" else min
    best = pick(p[1] for p in points)
    return next(p for p in points if p[1] == best)


def eval_curves(run: RunData) -> bytes | None:
    """``agg_metrics`` of each evaluated split against the step, the best evaluation marked."""
    series = eval_series(run)
    if not series:
        return None
    mode = (run.config.get("run") or {}).get("best_mode", "max")
    metric = run.agg_metric_name() or "agg_metrics"
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for label, points in series.items():
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        step, value = best_point(points, mode)
        ax.scatter([step], [value], s=160, marker="*", color=line.get_color(), zorder=3, edgecolor="black")
        ax.annotate(f"best {value:.4g} @ {step}", (step, value), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"agg_metrics ({metric})")
    ax.set_title("evaluation during training (best: star)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def fewshot_rows(run: RunData) -> dict[str, list[tuple[int, float, float, list]]]:
    """``{"dataset/split": [(shots, mean, std, trials), ...]}`` of the few-shot table (scored cells only)."""
    table = run.fewshot_table or {}
    rows = {}
    for data, row in (table.get("rows") or {}).items():
        cells = [
            (int(s), c["mean"], c.get("std") or 0.0, c.get("trials") or [])
            for s, c in row.items()
            if isinstance(c, dict) and _numeric(c.get("mean"))
        ]
        if cells:
            rows[data] = sorted(cells)
    return rows


def fewshot_curve(runs: Sequence[RunData], reference: dict | None = None) -> bytes | None:
    """Metric against the number of shots per dataset/split: mean over trials, std as error bars;
    the runs of ``runs`` side by side, and the reference's published rows dashed."""
    panels: dict[str, list] = {}
    for run in runs:
        for data, cells in fewshot_rows(run).items():
            panels.setdefault(data, []).append((run.name, cells))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (data, entries) in zip(axes.flat, panels.items()):
        for name, cells in entries:
            ax.errorbar(
                [c[0] for c in cells],
                [c[1] for c in cells],
                yerr=[c[2] for c in cells],
                marker="o",
                capsize=4,
                label=name,
            )
        ref = ((reference or {}).get("rows") or {}).get(data.split("/")[0])
        if ref:
            shots = sorted(ref["shots"])
            ax.plot(
                shots,
                [ref["shots"][s] for s in shots],
                linestyle="--",
                marker="s",
                color="gray",
                label=reference.get("label", "reference"),
            )
        ax.set_xticks(sorted({c[0] for _, cells in entries for c in cells}))
        ax.set_title(data)
        ax.set_xlabel("shots")
        ax.set_ylabel("agg_metrics (mean ± std over trials)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)

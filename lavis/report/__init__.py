"""The HTML report of a run: ``python -m lavis.report RUN_DIR [--out report.html] [--compare OTHER_RUN_DIR]``.

One self-contained file (plots and image thumbnails embedded, no network access) with the run's header
and provenance, training curves, evaluation metrics over steps, the few-shot curve and a gallery of every
evaluated sample; the plots are also written to ``RUN_DIR/plots/*.png``. train.py and evaluate.py write
``RUN_DIR/report.html`` at the end of every run (:func:`report_after_run`).
"""

from __future__ import annotations

import os
from pathlib import Path

from lavis.common.fileio import atomic_write_bytes, atomic_write_text

__all__ = ["build_report", "report_after_run"]


def build_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    compare: str | os.PathLike | None = None,
    status: str | None = None,
) -> Path:
    """Write the report of ``run_dir`` (default ``RUN_DIR/report.html``) and its plots; returns its path.

    ``compare``: another run directory shown beside this one (few-shot curves on one plot, and each
    gallery next to the other run's on the same samples). ``status``: the run's outcome, when the caller
    knows it. A directory that is not a run raises DataError; an unknown ``run.reference_results``
    ConfigError.
    """
    from lavis.report import plots
    from lavis.report.gallery import TextTable, Thumbnails, build_galleries
    from lavis.report.page import esc, eval_table, fewshot_table_html, header, page, plot_img
    from lavis.report.references import reference_results
    from lavis.report.run_data import load_run

    run = load_run(run_dir)
    other = load_run(compare) if compare is not None else None
    runs = [run] + ([other] if other else [])
    reference = reference_results((run.config.get("run") or {}).get("reference_results"))
    figures = {
        "training_curves": plots.training_curves(run),
        "eval_over_steps": plots.eval_curves(run),
        "fewshot_curve": plots.fewshot_curve(runs, reference),
    }
    plots_dir = run.run_dir / "plots"
    for name, png in figures.items():
        if png is not None:
            atomic_write_bytes(plots_dir / f"{name}.png", png)
    images, texts = Thumbnails(), TextTable()
    galleries = build_galleries(runs, images, texts)
    title = f"{run.name}" + (f" vs {other.name}" if other else "")
    sections = [header(run, status, other)]
    if run.train_records:
        sections.append(
            f'<section id="training"><h2>Training curves</h2>'
            f"{plot_img(figures['training_curves'], 'training curves', 'plot-training')}</section>"
        )
    if figures["eval_over_steps"] is not None:
        sections.append(
            f'<section id="evaluation"><h2>Evaluation over steps</h2>{eval_table(run)}'
            f"{plot_img(figures['eval_over_steps'], 'evaluation over steps', 'plot-eval')}</section>"
        )
    if figures["fewshot_curve"] is not None:
        note = (
            f'<p class="muted">Reference: {esc(reference["label"])}, {esc(reference["source"])}.</p>'
            if reference
            else ""
        )
        sections.append(
            f'<section id="fewshot"><h2>Few-shot</h2>{fewshot_table_html(runs, reference)}{note}'
            f"{plot_img(figures['fewshot_curve'], 'few-shot curve', 'plot-fewshot')}</section>"
        )
    data = {"galleries": galleries, "texts": texts.strings, "images": images.uris, "compare_default": other is not None}
    target = Path(out) if out is not None else run.run_dir / "report.html"
    atomic_write_text(target, page(f"Run report: {title}", sections, data))
    return target


def report_after_run(run_dir: str | os.PathLike | None, status: str | None = None) -> Path | None:
    """``build_report`` at the end of train.py / evaluate.py: rank 0 only, and never failing the run.

    Any error becomes a warning in the log (the run's results are already written); returns the path, or
    None when this is not rank 0 or the report failed.
    """
    if run_dir is None or int(os.environ.get("RANK", "0")) != 0:
        return None
    from lavis.common.logging import get_logger

    log = get_logger()
    try:
        path = build_report(run_dir, status=status)
    except Exception as err:  # noqa: BLE001 - a report is a view of the results, never a reason to fail
        log.warning("could not write the run report of %s: %s: %s", run_dir, type(err).__name__, err)
        return None
    log.info("run report: %s", path)
    return path

"""The report page: one self-contained HTML file (CSS, JavaScript, plots and thumbnails inline)."""

from __future__ import annotations

import base64
import datetime
import html
import json
from importlib import resources
from typing import Any

from lavis.report.plots import best_point, eval_series, fewshot_rows
from lavis.report.run_data import RunData

# The run keys the header shows, by kind of run (the others keep their defaults and would only add noise).
_TRAIN_KEYS = (
    "task",
    "max_epoch",
    "max_steps",
    "batch_size_train",
    "accum_grad_iters",
    "init_lr",
    "lr_sched",
    "weight_decay",
    "amp",
    "train_max_shots",
    "valid_splits",
    "test_splits",
    "metrics",
    "agg_metric",
    "best_metric",
    "seed",
)
_FEWSHOT_KEYS = (
    "task",
    "amp",
    "test_splits",
    "num_shots",
    "num_trials",
    "trial_seeds",
    "num_samples",
    "demo_split",
    "demo_method",
    "zero_shot_text_demos",
    "num_beams",
    "max_new_tokens",
    "length_penalty",
    "metrics",
    "agg_metric",
    "reference_results",
)


def _asset(name: str) -> str:
    return resources.files("lavis.report").joinpath(name).read_text(encoding="utf-8")


def esc(value: Any) -> str:
    """HTML-escaped ``str(value)``."""
    return html.escape(str(value), quote=True)


def kv_table(pairs: list[tuple[str, Any]]) -> str:
    """A two-column key/value table."""
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in pairs if v not in (None, "", [], {}))
    return f'<table class="kv">{rows}</table>'


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return [(prefix, " ".join(map(str, value)))]
    if isinstance(value, list):  # e.g. run_info.json's invocations: one numbered group each
        out = []
        for i, v in enumerate(value):
            out += _flatten(v, f"{prefix}.{i}")
        return out
    return [(prefix, json.dumps(value) if isinstance(value, (dict, list)) else value)]


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = max(0, int(round(seconds)))
    return str(datetime.timedelta(seconds=seconds))


def kind(run: RunData) -> str:
    """``few-shot evaluation``, ``training`` or ``evaluation``."""
    if run.fewshot_table is not None or any(f.shots is not None for f in run.sample_files):
        return "few-shot evaluation"
    if run.train_records:
        return "training"
    return "evaluation"


def status(run: RunData, given: str | None) -> str:
    """The run's status: the caller's word, else run_info.json's, else what the files show."""
    if given:
        return given
    if run.run_info and run.run_info.get("status"):
        return str(run.run_info["status"])
    if run.fewshot_table is not None:
        return "evaluated (few-shot table written)"
    steps = [r["step"] for r in run.train_records if isinstance(r.get("step"), int)]
    return f"last logged step {max(steps)}" if steps else "unknown"


def header(run: RunData, given_status: str | None, other: RunData | None = None) -> str:
    """The run, model, checkpoint and config summary, and the provenance of run_info.json (of ``run``;
    ``other``, the compared run, is named with its checkpoint)."""
    cfg = run.config
    model = cfg.get("model") or {}
    run_cfg = cfg.get("run") or {}
    adapters = model.get("adapters") or {}
    adapter = adapters.get("method")
    if adapter and adapter != "none":
        adapter = f"{adapter} (r={adapters.get('r')})" if adapters.get("r") is not None else adapter
    trainable = model.get("trainable") or {}
    checkpoint = (run.fewshot_table or {}).get("model") or run_cfg.get("resume_ckpt_path")
    best = run.run_dir / "checkpoints" / "best.pt"
    summary = [
        ("run", run.name),
        ("directory", run.run_dir),
        ("kind", kind(run)),
        ("status", status(run, given_status)),
        ("wall time", _duration(run.wall_time_s)),
        ("model", f"{model.get('arch', '?')} / {model.get('model_type', '?')}" if model else None),
        ("adapters", adapter),
        ("trainable", ", ".join(k for k, v in trainable.items() if v) or None),
        ("checkpoint", checkpoint),
        ("best checkpoint", best if best.is_file() else None),
        (
            "datasets",
            ", ".join(
                f"{name} ({', '.join(sec.get('splits') or []) or 'default splits'})" if isinstance(sec, dict) else name
                for name, sec in (cfg.get("datasets") or {}).items()
            )
            or None,
        ),
    ]
    if other is not None:
        summary.append(
            (
                "compared with",
                f"{other.name} ({other.run_dir}), checkpoint {(other.fewshot_table or {}).get('model', '?')}",
            )
        )
    keys = _FEWSHOT_KEYS if kind(run) == "few-shot evaluation" else _TRAIN_KEYS
    config = [
        (k, " ".join(map(str, run_cfg[k])) if isinstance(run_cfg.get(k), list) else run_cfg.get(k))
        for k in keys
        if k in run_cfg
    ]
    if run.run_info is None:
        provenance = '<p class="muted">run_info.json not found (runs made before it existed have none).</p>'
    else:
        provenance = kv_table(_flatten(run.run_info)[:60])
    return (
        f'<section id="summary"><div class="columns"><div><h2>Run</h2>{kv_table(summary)}</div>'
        f"<div><h2>Config (run section)</h2>{kv_table(config)}</div>"
        f"<div><h2>Provenance</h2>{provenance}</div></div></section>"
    )


def plot_img(png: bytes | None, alt: str, plot_id: str) -> str:
    """An ``<img>`` of PNG bytes as a data URI (or a note when there was nothing to draw)."""
    if png is None:
        return f'<p class="muted">no data for {esc(alt)}</p>'
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<img class="plot" id="{esc(plot_id)}" alt="{esc(alt)}" src="{uri}">'


def eval_table(run: RunData) -> str:
    """Best evaluation per split (the same values as metrics.jsonl)."""
    series = eval_series(run)
    if not series:
        return ""
    mode = (run.config.get("run") or {}).get("best_mode", "max")
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{len(points)}</td><td>{points[-1][1]:.4f}</td>"
        f"<td>{best_point(points, mode)[1]:.4f}</td><td>{best_point(points, mode)[0]}</td></tr>"
        for label, points in series.items()
    )
    return (
        '<table class="grid" id="eval-table"><tr><th>dataset/split</th><th>evaluations</th><th>last</th>'
        f"<th>best</th><th>best step</th></tr>{rows}</table>"
    )


def fewshot_table_html(runs: list[RunData], reference: dict | None) -> str:
    """Mean ± std over trials per shot count, each run's rows and the reference's."""
    body, shots = [], set()
    per_run = [(run, fewshot_rows(run)) for run in runs]
    for _, rows in per_run:
        for cells in rows.values():
            shots |= {c[0] for c in cells}
    if not shots:
        return ""
    shots = sorted(shots)
    for run, rows in per_run:
        for data, cells in rows.items():
            by_shot = {c[0]: c for c in cells}
            tds = "".join(
                f'<td title="trials: {esc(", ".join(f"{t:.4g}" for t in by_shot[s][3]))}">'
                f"{by_shot[s][1]:.2f} ± {by_shot[s][2]:.2f}</td>"
                if s in by_shot
                else "<td></td>"
                for s in shots
            )
            body.append(f"<tr><td>{esc(run.name)}: {esc(data)}</td>{tds}</tr>")
    for dataset, row in ((reference or {}).get("rows") or {}).items():
        if any(dataset == data.split("/")[0] for _, rows in per_run for data in rows):
            tds = "".join(f"<td>{row['shots'][s]:.1f}</td>" if s in row["shots"] else "<td></td>" for s in shots)
            body.append(
                f'<tr class="muted"><td>{esc(reference["label"])}: {esc(dataset)} ({esc(row["metric"])})</td>{tds}</tr>'
            )
    head = "".join(f"<th>{s}-shot</th>" for s in shots)
    return f'<table class="grid" id="fewshot-table"><tr><th>run: data</th>{head}</tr>{"".join(body)}</table>'


GALLERY_HTML = """
<section id="gallery"><h2>Gallery</h2>
<p class="muted">Every evaluated sample with its image, demonstrations, prompt, prediction, references and score;
worst first. Click a score heading to sort, choose a gallery (split, shots, trial) and a comparison.</p>
<div id="gallery-controls">
  <label>gallery <select id="gallery-select"></select></label>
  <label>compare with <select id="gallery-compare"></select></label>
  <span id="gallery-filters"></span>
  <label>search <input id="gallery-search" type="search" placeholder="prediction, reference, question"></label>
  <label>rows per page <select id="page-size">
    <option>50</option><option>100</option><option>250</option></select></label>
  <span class="pager"><button id="prev-page">previous</button><button id="next-page">next</button></span>
</div>
<div id="gallery-info"></div>
<table class="gallery"><thead id="gallery-head"></thead><tbody id="gallery-body"></tbody></table>
</section>
"""


def page(title: str, sections: list[str], data: dict) -> str:
    """The whole HTML document; ``data`` (galleries, texts, images) goes inline as JSON."""
    # "</" inside a <script> would end it: JSON allows the escaped form.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{_asset('report.css')}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="subtitle">PET-VLM run report, generated {esc(generated)}</p>'
        + "".join(sections)
        + (
            GALLERY_HTML
            if data["galleries"]
            else '<section id="gallery"><h2>Gallery</h2><p class="muted">no samples_*.jsonl in this run</p></section>'
        )
        + f'<script type="application/json" id="report-data">{payload}</script>'
        + f"<script>{_asset('report.js')}</script></body></html>\n"
    )

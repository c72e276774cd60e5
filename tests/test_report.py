"""The run report of real tiny runs: a training run and a few-shot evaluation, and what the page holds.

The page's data is the JSON of its ``#report-data`` script; these tests read it back and compare it with
the run's files (metrics.jsonl, the few-shot table, the samples files). tests/test_report_browser.py opens
the same pages in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest
from browser import headless_chromium
from conftest import FAST_DECODING, FAST_JOINT_DECODING, REPO, read_jsonl, shapes_section, write_config
from PIL import Image

from lavis import demo
from lavis.cli import evaluate_main, train_main
from lavis.report import build_report, report_after_run
from lavis.report.__main__ import main as report_cli
from lavis.report.references import REFERENCE_RESULTS
from lavis.runners.sample_log import prediction, read_samples, sample_record, write_samples
from lavis.tasks.base import FewShotConfig

pytestmark = pytest.mark.slow


def page_data(html: str) -> dict:
    """The JSON the report embeds for its gallery."""
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert match, "no #report-data in the page"
    return json.loads(match.group(1))


def fewshot_run(tmp_path: Path, shapes_root: Path, name: str, checkpoint: Path | None) -> Path:
    """A few-shot evaluation (captions and VQA, 0 and 2 shots, 2 trials) of the tiny model; its run dir."""
    cfg = write_config(
        tmp_path / f"{name}.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root), "shapes_vqa": shapes_section(shapes_root)},
        run={
            "task": "caption_vqa",
            "device": "cpu",
            "test_splits": ["val"],
            "demo_split": "train",
            "num_shots": [0, 2],
            "num_trials": 2,
            "trial_seeds": [1, 2],
            "num_samples": 12,
            "batch_size_eval": 12,
            "metrics": ["CIDEr"],
            "zero_shot_text_demos": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": name,
            **FAST_JOINT_DECODING,
        },
    )
    evaluate_main(["--cfg-path", str(cfg)] + (["--checkpoint", str(checkpoint)] if checkpoint else []))
    return tmp_path / "out" / name


@pytest.fixture(scope="module")
def fewshot_runs(tmp_path_factory, shapes_root, trained_checkpoint):
    """(trained, untrained) few-shot run directories; each got its report.html from evaluate.py."""
    tmp = tmp_path_factory.mktemp("report")
    return fewshot_run(tmp, shapes_root, "trained", trained_checkpoint), fewshot_run(
        tmp, shapes_root, "untrained", None
    )


def test_training_run_report_has_curves_and_the_last_evaluation(tmp_path, shapes_root):
    cfg = write_config(
        tmp_path / "train.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root)},
        run={
            "task": "captioning",
            "device": "cpu",
            "max_epoch": 2,
            "batch_size_train": 32,
            "batch_size_eval": 5,
            "init_lr": 2.0e-3,
            "min_lr": 1.0e-4,
            "warmup_steps": 2,
            "weight_decay": 0.0,
            "valid_splits": ["val"],
            "log_freq": 1,
            "progress_bar": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
            "metrics": ["CIDEr"],
            "max_grad_norm": 1.0,
            **FAST_DECODING,
        },
    )
    train_main(["--cfg-path", str(cfg)])
    run_dir = tmp_path / "out" / "run"
    html = (run_dir / "report.html").read_text()  # written by train.py itself
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing to fetch
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"training_curves.png", "eval_over_steps.png"}
    assert 'id="plot-training"' in html and 'id="plot-eval"' in html
    assert "finished" in html and "openflamingo / tiny" in html

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if m["split"] == "val"]
    assert len(evals) == 2
    best = max(evals, key=lambda m: m["CIDEr"])
    assert f"<td>{best['CIDEr']:.4f}</td><td>{best['step']}</td>" in html  # the best evaluation, marked
    # One samples file per evaluation; the gallery shows the last one, every sample, with the same scores.
    files = {p.name for p in run_dir.glob("samples_*.jsonl")}
    assert files == {f"samples_shapes_caption_val_step{m['step']}.jsonl" for m in evals}
    (gallery,) = page_data(html)["galleries"]
    samples = read_samples(run_dir / f"samples_shapes_caption_val_step{evals[-1]['step']}.jsonl")
    assert gallery["title"] == f"shapes_caption/val (step {evals[-1]['step']})"
    assert len(gallery["rows"]) == len(samples) == 5
    assert {r["id"]: r["score"] for r in gallery["rows"]} == pytest.approx({s["doc_id"]: s["CIDEr"] for s in samples})
    assert statistics.fmean(r["score"] for r in gallery["rows"]) == pytest.approx(evals[-1]["CIDEr"])


def test_fewshot_report_gallery_matches_the_results_files(fewshot_runs):
    run_dir, _ = fewshot_runs
    html = (run_dir / "report.html").read_text()
    table = json.loads((run_dir / "fewshot_table.json").read_text())
    assert (run_dir / "plots" / "fewshot_curve.png").is_file() and 'id="plot-fewshot"' in html
    for row in table["rows"].values():
        for cell in row.values():
            assert f"{cell['mean']:.2f} ± {cell['std']:.2f}" in html
    data = page_data(html)
    galleries = {(g["dataset"], g["shots"], g["trial"]): g for g in data["galleries"]}
    assert set(galleries) == {(d, s, t) for d in ("shapes_caption", "shapes_vqa") for s in (0, 2) for t in (0, 1)}
    metrics = {(m["dataset"], m["shots"], m["trial"]): m for m in read_jsonl(run_dir / "metrics.jsonl")}
    for key, gallery in galleries.items():
        dataset, shots, trial = key
        samples = read_samples(run_dir / gallery["file"])
        # num_samples 12: all 5 val images, 12 of the 25 val questions.
        expected_rows = {"shapes_caption": 5, "shapes_vqa": 12}[dataset]
        assert len(gallery["rows"]) == len(samples) == metrics[key]["num_queries"] == expected_rows
        score = "CIDEr" if dataset == "shapes_caption" else "vqa_accuracy"
        assert gallery["score_key"] == score
        rows = {r["id"]: r for r in gallery["rows"]}
        assert {i: r["score"] for i, r in rows.items()} == {s["doc_id"]: s[score] for s in samples}
        assert {i: r["pred"] for i, r in rows.items()} == {s["doc_id"]: prediction(s) for s in samples}
        # Scores agree with the results files: the corpus CIDEr is the mean of the per-image values; the
        # VQA overall is the mean of the per-question accuracies (each rounded to 2 decimals).
        expected = metrics[key]["CIDEr" if score == "CIDEr" else "overall"]
        assert statistics.fmean(r["score"] for r in rows.values()) == pytest.approx(expected, abs=0.01)
        results = json.loads(
            (
                run_dir / "results" / f"val_{shots}shot_trial{trial}_"
                f"{'caption' if score == 'CIDEr' else 'vqa'}_results.json"
            ).read_text()
        )
        field = "caption" if score == "CIDEr" else "answer"
        id_key = "image_id" if score == "CIDEr" else "question_id"
        assert {r[id_key]: r[field] for r in results} == {i: r["pred"] for i, r in rows.items()}
        for row, sample in zip(gallery["rows"], samples):
            assert data["images"][row["img"]].startswith("data:image/jpeg;base64,")
            assert len(row["demos"]) == shots and all(d[0] is not None for d in row["demos"])
            # The prompt is stored as chunks: the demonstrations' texts, then the query.
            assert "".join(data["texts"][d[1]] for d in row["demos"]) + data["texts"][row["q"]] == sample["input"]
        if dataset == "shapes_vqa":
            assert set(gallery["filters"]) == {"answer_type", "question_type"}
            assert all(len(r["target"]) == 10 and "question_type" in r for r in gallery["rows"])


def test_compare_puts_both_runs_galleries_in_one_page(fewshot_runs, tmp_path, capsys):
    trained, untrained = fewshot_runs
    out = tmp_path / "compare.html"
    assert report_cli([str(trained), "--compare", str(untrained), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = page_data(out.read_text())
    assert data["compare_default"] is True
    runs = {g["run"] for g in data["galleries"]}
    assert runs == {"trained", "untrained"}
    assert "trained vs untrained" in out.read_text()
    # The two runs evaluated the same queries (the same seed picks them): every row has a counterpart.
    for g in data["galleries"]:
        twin = next(o for o in data["galleries"] if o["run"] != g["run"] and o["file"] == g["file"])
        assert {r["id"] for r in g["rows"]} == {r["id"] for r in twin["rows"]}


def test_the_demo_ends_with_the_untrained_and_trained_models_side_by_side(fewshot_runs, tmp_path, capsys):
    trained, untrained = fewshot_runs
    (tmp_path / "before").symlink_to(untrained)
    (tmp_path / "after").symlink_to(trained)
    demo._report(tmp_path)
    assert f"{tmp_path / 'report.html'}" in capsys.readouterr().out
    data = page_data((tmp_path / "report.html").read_text())
    first = data["galleries"][0]
    assert first["run"] == "untrained" and data["compare_default"] is True
    assert any(g["run"] == "trained" and g["file"] == first["file"] for g in data["galleries"])


def test_reference_numbers_named_by_the_config_are_drawn(tmp_path):
    run_dir = tmp_path / "ref"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run: {task: captioning, reference_results: openflamingo-9b}\n")
    (run_dir / "fewshot_table.json").write_text(
        json.dumps(
            {
                "model": "m",
                "metric": "agg_metrics",
                "rows": {
                    "coco_caption/test": {
                        "0": {"mean": 60.0, "std": 1.0, "trials": [59.0, 61.0]},
                        "4": {"mean": 70.0, "std": 0.5, "trials": [69.5, 70.5]},
                    }
                },
            }
        )
    )
    html = build_report(run_dir).read_text()
    assert "OpenFlamingo-9B (published): coco_caption (CIDEr)" in html
    assert "<td>65.5</td><td>74.3</td>" in html and "60.00 ± 1.00" in html
    assert "no samples_*.jsonl in this run" in html
    # The schema accepts exactly the names the report knows.
    assert FewShotConfig.__annotations__["reference_results"] and set(REFERENCE_RESULTS) == {"openflamingo-9b"}


def test_a_failed_report_is_a_warning_not_an_error(tmp_path, caplog, monkeypatch):
    assert report_after_run(tmp_path / "missing") is None
    assert "could not write the run report" in caplog.text
    assert report_cli([str(tmp_path / "missing")]) == 2
    monkeypatch.setenv("RANK", "1")
    assert report_after_run(tmp_path) is None  # only rank 0 writes it


# --- in a real browser -------------------------------------------------------------------------------------

ARTIFACTS = Path(os.environ.get("PETVLM_TEST_ARTIFACTS", REPO / "test-artifacts"))
ROWS = "[...document.querySelectorAll('#gallery-body tr.row')]"


def choose(browser, select_id: str, label_part: str) -> None:
    """Pick the option of ``select_id`` whose label contains ``label_part``, as a user's choice (change event)."""
    assert browser.run(
        f"""
        const s = document.getElementById('{select_id}');
        const o = [...s.options].find(o => o.text.includes(arguments[0]));
        if (!o) return false;
        s.value = o.value; s.dispatchEvent(new Event('change')); return true;""",
        label_part,
    )


def shown_scores(browser) -> list:
    return browser.run(f"return {ROWS}.map(r => r.dataset.score === '' ? null : +r.dataset.score)")


def test_report_in_headless_chromium(fewshot_runs, tmp_path):
    trained, untrained = fewshot_runs
    with headless_chromium() as browser:
        browser.open((trained / "report.html").as_uri())
        assert browser.console_errors() == []
        data = browser.run("return JSON.parse(document.getElementById('report-data').textContent)")
        assert browser.run(f"return {ROWS}.length") == min(50, len(data["galleries"][0]["rows"]))
        images = browser.run("return [...document.images].map(i => [i.complete, i.naturalWidth, i.className])")
        assert sum(c == "query-img" for _, _, c in images) == len(data["galleries"][0]["rows"])
        assert {c for _, _, c in images} >= {"plot", "query-img"}
        assert all(done and width > 0 for done, width, _ in images), images

        choose(browser, "gallery-select", "shapes_vqa/val 2-shot trial 0")
        samples = read_samples(trained / "samples_shapes_vqa_val_2shot_trial0.jsonl")
        scores = sorted(s["vqa_accuracy"] for s in samples)
        assert scores[0] < scores[-1], "the trained model should get some questions right and some wrong"
        assert shown_scores(browser) == scores  # worst first by default
        assert browser.run("return document.querySelectorAll('img.demo-img').length") == 2 * len(samples)
        browser.click("#sort-score")
        assert shown_scores(browser)[0] == max(scores) and shown_scores(browser) == scores[::-1]
        browser.click("#sort-score")
        assert shown_scores(browser)[0] == min(scores) == scores[0]
        choose(browser, "filter-answer_type", "number")
        numbers = sorted(s["vqa_accuracy"] for s in samples if s["answer_type"] == "number")
        assert shown_scores(browser) == numbers
        assert browser.console_errors() == []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.run("document.getElementById('gallery').scrollIntoView()")
        shot = ARTIFACTS / "report_fewshot.png"
        shot.write_bytes(browser.screenshot())
        print(f"screenshot: {shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Two runs side by side: the other run's prediction and score beside each sample, sortable by Δ.
        compare = build_report(trained, out=tmp_path / "compare.html", compare=untrained)
        browser.open(compare.as_uri())
        assert browser.console_errors() == []
        heads = browser.run("return [...document.querySelectorAll('#gallery-head th')].map(t => t.textContent)")
        assert any(h.startswith("prediction (untrained") for h in heads) and any(h.startswith("Δ") for h in heads)
        browser.click("#sort-delta")
        deltas = browser.run(f"return {ROWS}.map(r => r.querySelector('td.delta').textContent)")
        values = [float(d) for d in deltas if d != "–"]
        assert values == sorted(values)


def test_gallery_of_5000_samples_pages_in_the_browser(tmp_path):
    run_dir = tmp_path / "big"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("datasets: {vqav2: {}}\nrun: {task: vqa}\n")
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    samples = [
        sample_record(
            i,
            input=f"<image>Question:q{i} Short answer:",
            target=["yes"] * 10,
            resps=f"a{i}",
            filtered_resps=f"a{i}",
            image=str(image),
            vqa_accuracy=float((i * 37) % 101),
            answer_type="yes/no" if i % 2 else "other",
            question_type="is the",
        )
        for i in range(5000)
    ]
    write_samples(run_dir / "samples_vqav2_val_0shot_trial0.jsonl", samples)
    report = build_report(run_dir)
    with headless_chromium() as browser:
        browser.open(report.as_uri())
        assert browser.console_errors() == []
        assert browser.run(f"return {ROWS}.length") == 50
        assert "5000 of 5000 samples" in browser.run("return document.getElementById('gallery-info').textContent")
        assert shown_scores(browser)[:3] == [0.0, 0.0, 0.0]
        browser.click("#next-page")
        assert "page 2 of 100" in browser.run("return document.getElementById('gallery-info').textContent")
        elapsed = browser.run(
            "const t = performance.now(); document.getElementById('sort-score').click();return performance.now() - t"
        )
        assert shown_scores(browser)[0] == 100.0
        print(f"sorting 5000 rows and rendering a page took {elapsed:.1f} ms")

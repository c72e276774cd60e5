"""The suite's tasks few-shot on their synthetic stand-ins with the tiny model: 1 and 2 processes agree,
results.json is complete, and a stopped evaluation resumed gives byte-identical samples and metrics.

The model is the session's tiny OpenFlamingo trained on shapes (conftest.trained_checkpoint): the
stand-ins draw the same scenes, so its answers and class scores vary with the input.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import FAST_DECODING, check_ok, run_entry, write_config

import lavis.runners.eval_cache as eval_cache
from lavis.cli import evaluate_main

pytestmark = pytest.mark.slow

SMALL_VIS = {
    "train": {"name": "clip_image_eval", "image_size": 64},
    "eval": {"name": "clip_image_eval", "image_size": 64},
}
RUNS = {
    # task, datasets (name -> evaluated split), run keys
    # TextVQA's reader and metric are VizWiz's and OK-VQA's (tests/test_datasets_suite.py, the fixture tests).
    "vqa": (
        "vqa",
        {"okvqa": "val", "vizwiz": "val"},
        {
            "vqa_postprocess": "openflamingo_v2",
            "vqa_metric": "openflamingo_v2",
            "vqa_demo_answer": "first",
            "max_new_tokens": 3,
            **{k: v for k, v in FAST_DECODING.items() if k != "max_new_tokens"},
        },
    ),
    "classification": (
        "classification",
        {"hateful_memes": "dev", "imagenet": "val"},
        # prompt ensembling: tests/test_tasks_classification.py
        {"score_batch_size": 7},
    ),
    "captioning": ("captioning", {"flickr30k": "test"}, {"metrics": ["CIDEr"], **FAST_DECODING}),
}


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory) -> Path:
    from lavis.datasets.builders.shapes_suite import SuiteOptions, ensure_suite

    return ensure_suite(SuiteOptions(root=str(tmp_path_factory.mktemp("suite") / "s"), num_images=60))


def config(tmp_path: Path, suite_root: Path, which: str, run_name: str, shots=(0, 2)) -> Path:
    task, names, extra = RUNS[which]
    datasets = {
        f"shapes_{n}": {
            "splits": ["train", split],
            "vis_processor": SMALL_VIS,
            "suite": {"root": str(suite_root), "num_images": 60},
        }
        for n, split in names.items()
    }
    split = next(iter(names.values()))
    assert len(set(names.values())) == 1 or which == "classification"
    run = {
        "task": task,
        "device": "cpu",
        "test_splits": sorted(set(names.values())),
        "demo_split": "train",
        "num_shots": list(shots),
        "num_trials": 1,
        "trial_seeds": [3],
        "num_samples": 5,
        "batch_size_eval": 2,
        "output_dir": str(tmp_path / "out"),
        "run_name": run_name,
        **extra,
    }
    if which == "classification":
        # Hateful Memes evaluates dev, ImageNet val: one run per split keeps the config simple.
        run["test_splits"] = [split]
        datasets = {k: v for k, v in datasets.items() if k.endswith("hateful_memes")}
    return write_config(tmp_path / f"{run_name}.yaml", run=run, datasets=datasets)


def outputs(run_dir: Path) -> dict:
    """The files an evaluation must reproduce: samples files (bytes) and the results' metrics."""
    results = json.loads((run_dir / "results.json").read_text())
    files = {p.name: p.read_bytes() for p in sorted(run_dir.glob("samples_*.jsonl"))}
    return {
        "samples": files,
        "results": results["results"],
        "n-samples": results["n-samples"],
        "table": (run_dir / "fewshot_table.json").read_text(),
    }


def assert_close(a, b, path="") -> None:
    """Equal structures; floats within 1e-5 (relative), everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def by_id(data: bytes) -> dict:
    return {str(s["doc_id"]): s for s in map(json.loads, data.decode().splitlines())}


@pytest.mark.parametrize("which", ["vqa", "classification"])
def test_suite_task_two_processes_equal_one(which, tmp_path, suite_root, trained_checkpoint):
    runs = {}
    for nproc in (1, 2):
        cfg = config(tmp_path, suite_root, which, f"np{nproc}", shots=[2])  # 0 shots: the other tests
        check_ok(run_entry("evaluate.py", cfg, nproc=nproc, extra_args=["--checkpoint", str(trained_checkpoint)]))
        runs[nproc] = outputs(tmp_path / "out" / f"np{nproc}")
    # The same samples (the file order follows the ranks' shards) and the same metrics and stderr: texts and
    # ids exactly; class log-likelihoods to float32 rounding (rows are left-padded differently per rank).
    assert_close(runs[1]["results"], runs[2]["results"])
    assert runs[1]["n-samples"] == runs[2]["n-samples"]
    assert_close(
        {n: by_id(b) for n, b in runs[1]["samples"].items()}, {n: by_id(b) for n, b in runs[2]["samples"].items()}
    )
    names = sorted(runs[1]["samples"])
    assert len(names) == len(RUNS[which][1] if which == "vqa" else ["hateful_memes"])
    results = json.loads((tmp_path / "out" / "np1" / "results.json").read_text())
    for key in (
        "config",
        "config_fingerprint",
        "model_fingerprint",
        "checkpoint_fingerprint",
        "git_hash",
        "versions",
        "date",
        "end_date",
        "n-shot",
    ):
        assert key in results
    for per_split in results["results"].values():
        for cell in per_split.values():
            assert len(cell["per_trial"]) == 1 and cell["stderr_bootstrap"][0] is not None
    for counts in results["n-samples"].values():
        assert counts["effective"] == 5 and counts["original"] > 5
    samples = [json.loads(line) for line in runs[1]["samples"][names[-1]].decode().splitlines()]
    assert len(samples) == 5 and len({s["doc_id"] for s in samples}) == 5
    assert all({"doc_id", "input", "target", "filtered_resps", "image", "demo_ids"} <= set(s) for s in samples)
    if which == "classification":
        # Scores vary with the input (a trained model), so equal outputs are not equal constants.
        assert len({tuple(s["class_logprobs"]) for s in samples}) > 1


def test_flickr30k_captioning_on_its_stand_in(tmp_path, suite_root, trained_checkpoint, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    evaluate_main(
        ["--cfg-path", str(config(tmp_path, suite_root, "captioning", "cap")), "--checkpoint", str(trained_checkpoint)]
    )
    results = json.loads((tmp_path / "out" / "cap" / "results.json").read_text())
    assert list(results["results"]) == ["shapes_flickr30k/test"]
    assert results["results"]["shapes_flickr30k/test"]["2"]["mean"] > 0


def test_stopped_evaluation_resumes_to_identical_outputs(tmp_path, suite_root, trained_checkpoint, monkeypatch):
    cfg = config(tmp_path, suite_root, "classification", "full")
    args = ["--checkpoint", str(trained_checkpoint)]
    evaluate_main(["--cfg-path", str(cfg), *args])
    reference = outputs(tmp_path / "out" / "full")

    resumed_cfg = config(tmp_path, suite_root, "classification", "resumed")
    real_valid_step = eval_cache.CachedTask.valid_step
    calls = {"n": 0}

    def valid_step_then_sigterm(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # a real SIGTERM in the middle of the 0-shot cell's second batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_valid_step(self, model, batch)

    monkeypatch.setattr(eval_cache.CachedTask, "valid_step", valid_step_then_sigterm)
    evaluate_main(["--cfg-path", str(resumed_cfg), *args])  # returns (exit 0) with the work so far saved
    run_dir = tmp_path / "out" / "resumed"
    assert not (run_dir / "results.json").exists()
    records = (run_dir / "response_cache" / "records.rank0.jsonl").read_text().splitlines()
    assert len(records) == 4  # two finished batches of 2 samples
    # A kill (not a SIGTERM) can cut the last line: it is ignored and recomputed.
    with open(run_dir / "response_cache" / "records.rank0.jsonl", "a") as handle:
        handle.write('{"key": "cut by a ki')
    monkeypatch.setattr(eval_cache.CachedTask, "valid_step", real_valid_step)
    hits = []
    real_get = eval_cache.ResponseCache.get
    monkeypatch.setattr(eval_cache.ResponseCache, "get", lambda self, key: hits.append(key) or real_get(self, key))
    evaluate_main(["--cfg-path", str(resumed_cfg), *args])  # the same command continues the run
    assert outputs(run_dir) == reference
    assert len(hits) >= 4


def test_another_evaluation_never_continues_an_unfinished_one(tmp_path, suite_root, trained_checkpoint):
    cfg = config(tmp_path, suite_root, "classification", "one")
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(trained_checkpoint)])
    (tmp_path / "out" / "one" / "results.json").unlink()  # as if it had been stopped before the end
    before = sorted(p.name for p in (tmp_path / "out" / "one").iterdir())
    evaluate_main(
        [
            "--cfg-path",
            str(cfg),
            "--checkpoint",
            str(trained_checkpoint),
            "--options",
            "run.classification_prompt_ensembling=true",
        ]
    )
    # Another task config: its own fresh run directory; the unfinished one is left as it was.
    assert sorted(p.name for p in (tmp_path / "out" / "one").iterdir()) == before
    others = [p for p in (tmp_path / "out").iterdir() if p.name != "one" and (p / "results.json").is_file()]
    assert len(others) == 1

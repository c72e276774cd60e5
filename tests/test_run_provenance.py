"""What a run directory tells: run_info.json, progress figures, log.txt lines, results per evaluation,
the config history of a resumed run and the end-of-run summary (lavis/runners/provenance.py, progress.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST_DECODING, read_jsonl, shapes_section, write_config

from lavis.cli import train_main

pytestmark = pytest.mark.slow

RUN_INFO_KEYS = {
    "argv",
    "cwd",
    "git",
    "versions",
    "devices",
    "world_size",
    "host",
    "start_time",
    "end_time",
    "status",
    "invocations",
    "summary",
}


def config(tmp_path: Path, shapes_root: Path, **run) -> Path:
    return write_config(
        tmp_path / "train.yaml",
        datasets={"shapes_caption": {**shapes_section(shapes_root), "max_samples": 32}},
        run={
            "task": "captioning",
            "device": "cpu",
            "max_epoch": 2,
            "batch_size_train": 8,
            "batch_size_eval": 5,
            "valid_splits": ["val"],
            "metrics": ["CIDEr"],
            "log_freq": 2,
            "progress_bar": True,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
            **FAST_DECODING,
            **run,
        },
    )


def test_run_info_progress_log_lines_results_per_evaluation_and_summary(tmp_path, shapes_root, capsys):
    train_main(["--cfg-path", str(config(tmp_path, shapes_root))])
    run_dir = tmp_path / "out" / "run"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert RUN_INFO_KEYS <= set(info), sorted(info)
    assert info["status"] == "finished" and info["world_size"] == 1 and info["end_time"]
    assert info["git"] is None or {"commit", "dirty"} == set(info["git"])
    assert {"python", "torch", "transformers", "peft", "open_clip_torch"} <= set(info["versions"])
    assert len(info["invocations"]) == 1 and info["invocations"][0]["config"] == "configs/invocation_1.yaml"
    summary = info["summary"]
    assert summary["steps"] == 8 and summary["best"]["metric_name"] == "CIDEr"
    assert summary["best"]["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")

    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 4
    for record in train:
        assert record["time/step_s"] > 0 and record["throughput/samples_per_s"] > 0
        assert record["throughput/tokens_per_s"] > record["throughput/samples_per_s"]
        assert record["memory/peak_mb"] > 0 and record["eta_s"] >= 0
    assert train[-1]["eta_s"] == 0

    log = (run_dir / "log.txt").read_text()
    # The loss lines reach log.txt although the bar is on, with the trainable-parameter summary.
    assert log.count(" loss ") == 4 and "samples/s" in log and "ETA" in log
    assert "trainable parameters:" in log and "run finished: 8 step(s)" in log
    console = capsys.readouterr().out
    assert " loss " not in console and "run finished" in console  # the bar shows the loss instead

    # One results file per evaluation (epochs 0 and 1), and the latest under the plain name.
    results = sorted(p.name for p in (run_dir / "results").iterdir())
    assert results == [
        "val_caption_results.json",
        "val_epoch0_step4_caption_results.json",
        "val_epoch1_step8_caption_results.json",
    ]
    latest = json.loads((run_dir / "results" / "val_caption_results.json").read_text())
    assert latest == json.loads((run_dir / "results" / "val_epoch1_step8_caption_results.json").read_text())


def train_as_command(monkeypatch, *args: str) -> None:
    """train.py in-process, with the command line run_info.json records."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    train_main(list(args))


def test_a_resume_records_its_invocation_and_config(tmp_path, shapes_root, monkeypatch):
    cfg = config(tmp_path, shapes_root, max_epoch=1, valid_splits=[], progress_bar=False)
    train_as_command(monkeypatch, "--cfg-path", str(cfg), "--options", "run.max_steps=2")
    run_dir = tmp_path / "out" / "run"
    train_as_command(monkeypatch, "--cfg-path", str(cfg), "--options", "run.resume_ckpt_path=latest", "run.log_freq=1")
    info = json.loads((run_dir / "run_info.json").read_text())
    first, second = info["invocations"]
    assert first["status"] == "max_steps" and second["status"] == "finished"
    assert "run.resume_ckpt_path=latest" in second["argv"] and second["resumed_from"].endswith("step_00000002.pt")
    assert yaml.safe_load((run_dir / first["config"]).read_text())["run"]["log_freq"] == 2
    assert yaml.safe_load((run_dir / second["config"]).read_text())["run"]["log_freq"] == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["log_freq"] == 1  # not stale

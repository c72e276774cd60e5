"""train.py end to end on the tiny OpenFlamingo and the shapes captions: one process, then torchrun x 2 (gloo).

Each run trains, validates with CIDEr, tests, and leaves the run directory of the README:
config.yaml, log.txt, metrics.jsonl, checkpoints/ and results/ (COCO-format caption results).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    FAST_DECODING,
    REPO,
    check_ok,
    read_jsonl,
    run_entry,
    shapes_section,
    write_config,
)

from lavis.cli import train_main

pytestmark = pytest.mark.slow


def caption_run(tmp_path: Path, shapes_root: Path, **run) -> Path:
    return write_config(
        tmp_path / "caption.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root)},
        run={
            "task": "captioning",
            "device": "cpu",
            "max_epoch": 1,
            "batch_size_train": 8,
            "batch_size_eval": 4,
            "init_lr": 2.0e-3,
            "min_lr": 1.0e-4,
            "warmup_steps": 3,
            "weight_decay": 0.0,
            "param_groups": [{"match": "(attn|ff)_gate$", "lr_scale": 10.0}],
            "valid_splits": ["val"],
            "test_splits": ["test"],
            "log_freq": 1,
            "progress_bar": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
            "metrics": ["CIDEr", "BLEU"],
            **FAST_DECODING,
            **run,
        },
    )


def check_run_dir(run_dir: Path, world_size: int) -> list[dict]:
    """The files every training run leaves; returns the metrics records."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["task"] == "captioning" and saved["model"]["model_type"] == "tiny"
    assert f"({world_size} process(es), cpu, fp32)" in (run_dir / "log.txt").read_text()

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    steps = train[-1]["step"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(r["loss"] > 0 for r in train)
    evals = {r["split"]: r for r in records if r["split"] != "train"}
    assert set(evals) == {"val", "test"}
    for record in evals.values():
        assert record["dataset"] == "shapes_caption" and record["step"] == steps
        assert record["agg_metrics"] == record["CIDEr"] and record["CIDEr"] >= 0
        assert {"Bleu_1", "Bleu_4"} <= set(record), record

    checkpoints = run_dir / "checkpoints"
    state = torch.load(checkpoints / f"step_{steps:08d}.pt", map_location="cpu", weights_only=False)
    assert state["progress"]["global_step"] == steps and state["world_size"] == world_size
    assert state["model"] and all(
        "lora_" in k or "perceiver" in k or "gated_cross_attn" in k or "embed" in k for k in state["model"]
    ), sorted(state["model"])[:5]
    assert (checkpoints / "best.pt").is_file()

    # COCO caption results format: a list of {"image_id": int, "caption": str}, every image of the split once.
    for split in ("val", "test"):
        results = json.loads((run_dir / "results" / f"{split}_caption_results.json").read_text())
        gt = json.loads(
            Path(
                saved["datasets"]["shapes_caption"]["shapes"]["root"], "annotations", f"captions_shapes_{split}.json"
            ).read_text()
        )
        assert sorted(r["image_id"] for r in results) == sorted(image["id"] for image in gt["images"])
        assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    return records


def test_single_process_trains_the_loss_down_and_writes_the_run_dir(tmp_path, shapes_root):
    # 40 train images x 5 captions, batch 7: one epoch of about 30 steps, then val and test.
    cfg = caption_run(tmp_path, shapes_root, batch_size_train=7)
    proc = run_entry("train.py", cfg)
    check_ok(proc)
    assert "Traceback" not in proc.stderr
    records = check_run_dir(tmp_path / "out" / "run", world_size=1)
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) >= 28
    first, last = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    # A real decrease, not noise: the tiny LM learns the shapes vocabulary within an epoch.
    assert last < 0.5 * first, (first, last, losses)


def test_torchrun_two_processes_trains_and_writes_the_same_files(tmp_path, shapes_root):
    # Global batch 2 x 16 = 32: one epoch is 6 steps.
    cfg = caption_run(tmp_path, shapes_root, batch_size_train=16)
    proc = run_entry("train.py", cfg, nproc=2)
    check_ok(proc)
    records = check_run_dir(tmp_path / "out" / "run", world_size=2)
    train = [r for r in records if r["split"] == "train"]
    assert 6 <= len(train) <= 7
    # The logged loss is the mean over both ranks; it falls within the epoch.
    assert train[-1]["loss"] < train[0]["loss"]


def test_a_real_config_without_its_files_names_every_missing_path_in_one_message(tmp_path, monkeypatch, capsys):
    # train.py is `train_main()`; in-process saves a second of imports and sees the same exit and message.
    for variable in ("LLAMA_PATH", "OPENFLAMINGO_CHECKPOINT", "CLIP_VITL14_WEIGHTS", "PETVLM_DATA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here can satisfy the default data paths
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--cfg-path", str(REPO / "configs/projects/peft_flamingo/train/caption_coco_ft.yaml")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("error:") == 1 and "Traceback" not in message
    expected = {
        "model.tokenizer_path": "LLAMA_PATH",
        "model.lang_encoder_path": "LLAMA_PATH",
        "model.pretrained_checkpoint_path": "OPENFLAMINGO_CHECKPOINT",
        "model.clip_vision_encoder_pretrained": "CLIP_VITL14_WEIGHTS",
        "datasets.coco_caption.build_info.karpathy_file": "PETVLM_DATA",
        "datasets.coco_caption.build_info.images": "PETVLM_DATA",
        "datasets.coco_caption.build_info.annotations.val": "PETVLM_DATA",
        "datasets.coco_caption.build_info.annotations.test": "PETVLM_DATA",
    }
    lines = [line.strip() for line in message.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == len(expected), message
    for key, variable in expected.items():
        (line,) = [line for line in lines if line.startswith(f"- {key}:")]
        # Each line says how to set the key: the environment variable and the --options form.
        assert variable in line and f"--options {key}=PATH" in line, line
    assert "data/coco/annotations/dataset_coco.json does not exist" in message

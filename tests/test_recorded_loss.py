"""The first 8 training losses of the tiny OpenFlamingo at a fixed seed, recorded once (atol 1e-5).

They pin the prompts, the label masking, the loss and the optimizer through refactors: a change
to any of them moves these numbers. The run is the demo's joint caption + VQA training (LoRA on
the LM, dropout off), in process, batch 4, one process.
"""

from __future__ import annotations

import pytest
from conftest import TINY_MODEL, read_jsonl, shapes_section, write_config

from lavis.cli import train_main

pytestmark = pytest.mark.slow

# Recorded with torch 2.14 on the CPU, before token weighting (a 1-process, 1-micro-batch token mean is
# unchanged by it).
RECORDED = [
    6.284321308135986,
    6.310201168060303,
    6.033636093139648,
    5.844080924987793,
    5.490865707397461,
    5.214427947998047,
    4.966665744781494,
    4.716279983520508,
]


def test_first_8_losses_of_the_tiny_openflamingo_are_the_recorded_ones(tmp_path, shapes_root):
    cfg = write_config(
        tmp_path / "train.yaml",
        model=TINY_MODEL,
        datasets={"shapes_caption": shapes_section(shapes_root), "shapes_vqa": shapes_section(shapes_root)},
        run={
            "task": "caption_vqa",
            "device": "cpu",
            "seed": 7,
            "max_epoch": 1,
            "max_steps": 8,
            "batch_size_train": 4,
            "init_lr": 2.0e-3,
            "warmup_steps": 2,
            "weight_decay": 0.01,
            "log_freq": 1,
            "progress_bar": False,
            "save_epoch_end": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
        },
    )
    train_main(["--cfg-path", str(cfg)])
    losses = [r["loss"] for r in read_jsonl(tmp_path / "out" / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert losses == pytest.approx(RECORDED, abs=1e-5)

"""The README's worked example of a new project (configs/projects/examples/my_first_project.yaml) works as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, read_jsonl, run_entry, subprocess_env

from lavis.common.config import load_config

EXAMPLE = REPO / "configs" / "projects" / "examples" / "my_first_project.yaml"

pytestmark = pytest.mark.slow


def test_the_example_loads_and_fills_its_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("PETVLM_DATA", str(tmp_path))
    cfg = load_config(EXAMPLE)
    assert (cfg.model.arch, cfg.model.model_type, cfg.run.task) == ("openflamingo", "tiny", "captioning")
    # Defaults come from the model's, the builder's and the run's schemas, not from the example.
    assert cfg.model.tiny.lm_layers >= 1 and cfg.model.xattn_semantics == "v2"
    assert cfg.datasets.shapes_caption.vis_processor.eval.name == "clip_image_eval"
    assert cfg.datasets.shapes_caption.shapes.root == f"{tmp_path}/shapes_small"
    assert cfg.run.runner == "runner_base" and cfg.run.accum_grad_iters == 1


def test_the_example_trains_for_a_few_steps(tmp_path):
    out = tmp_path / "out"
    # The example as written, with its data generated under PETVLM_DATA, stopped after 3 steps.
    proc = run_entry(
        "train.py",
        EXAMPLE,
        ["run.max_steps=3", f"run.output_dir={out}", "run.run_name=first", "run.log_freq=1", "run.progress_bar=false"],
        env=subprocess_env(PETVLM_DATA=str(tmp_path / "data")),
    )
    check_ok(proc)
    run_dir = out / "first"
    assert (tmp_path / "data" / "shapes_small" / "shapes.json").is_file()
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    state = torch.load(run_dir / "checkpoints" / "step_00000003.pt", map_location="cpu", weights_only=False)
    assert state["progress"]["global_step"] == 3
    assert any("lora_" in name for name in state["model"])
    assert "run.max_steps=3 reached" in (run_dir / "log.txt").read_text()
    assert Path(state["config"]["datasets"]["shapes_caption"]["shapes"]["root"]).is_dir()

"""``evaluate.py --checkpoint`` accepts any checkpoint and writes to its own run directory.

best.pt of an adapter run (LoRA on the LM) and of a run that trains the perceiver and cross-attention
(no adapter) are evaluated with an evaluation config written for the plain pretrained model; 0-shot
with the query prompt alone is the runner's own validation, so the scores must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST_DECODING, TINY_MODEL, shapes_section, write_config

import lavis.runners.fewshot_eval as fewshot_eval
from lavis.cli import evaluate_main, train_main

pytestmark = pytest.mark.slow

STRUCTURES = {
    "lora": {
        **TINY_MODEL,
        "trainable": {
            "perceiver": False,
            "gated_cross_attn": False,
            "new_token_embeddings": False,
            "lm_embeddings": False,
        },
    },
    "xattn": {**TINY_MODEL, "adapters": {"method": None}},
}


def datasets(root: Path) -> dict:
    return {"shapes_caption": {**shapes_section(root), "max_samples": 32}}


@pytest.fixture(scope="module", params=sorted(STRUCTURES))
def trained_run(request, shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"train_{request.param}")
    cfg = write_config(
        out / "train.yaml",
        model=STRUCTURES[request.param],
        datasets=datasets(shapes_root),
        run={
            "task": "captioning",
            "device": "cpu",
            "batch_size_train": 16,
            "batch_size_eval": 5,
            "init_lr": 5e-3,
            "warmup_steps": 0,
            "valid_splits": ["val"],
            "metrics": ["CIDEr"],
            "progress_bar": False,
            "output_dir": str(out),
            "run_name": "run",
            **FAST_DECODING,
        },
    )
    train_main(["--cfg-path", str(cfg)])
    return out / "run"


def eval_config(path: Path, root: Path, output_dir: Path) -> Path:
    return write_config(
        path,
        model={"arch": "openflamingo", "model_type": "tiny"},
        datasets=datasets(root),
        run={
            "task": "captioning",
            "device": "cpu",
            "test_splits": ["val"],
            "demo_split": "train",
            "num_shots": [0],
            "zero_shot_text_demos": False,
            "batch_size_eval": 5,
            "metrics": ["CIDEr"],
            "output_dir": str(output_dir),
            **FAST_DECODING,
        },
    )


def table_score(run_dir: Path) -> float:
    table = json.loads((run_dir / "fewshot_table.json").read_text())
    return table["rows"]["shapes_caption/val"]["0"]["mean"]


def test_best_pt_and_the_run_directory_evaluate_like_the_runner_validated(trained_run, shapes_root, tmp_path):
    best = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert best["split"] == "val"
    cfg = eval_config(tmp_path / "eval.yaml", shapes_root, tmp_path / "evals")
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(trained_run / "checkpoints" / "best.pt")])
    by_best = tmp_path / "evals" / "eval_eval_run_best"
    assert table_score(by_best) == pytest.approx(best["CIDEr"], abs=1e-9)
    # The run directory resolves to its best.pt: the same evaluation, so the same folder (its response cache
    # answers); another decoding setting is another evaluation, in a fresh folder.
    table = (by_best / "fewshot_table.json").read_text()
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(trained_run)])
    assert (by_best / "fewshot_table.json").read_text() == table
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(trained_run), "--options", "run.max_new_tokens=4"])
    assert (tmp_path / "evals" / "eval_eval_run_best_1" / "fewshot_table.json").is_file()
    assert (by_best / "log.txt").read_text().count("shapes_caption") > 0  # the evaluation's own log


def test_evaluating_with_the_training_config_never_touches_the_training_run(trained_run):
    before = sorted(p.name for p in trained_run.iterdir())
    cfg = trained_run.parent / "train.yaml"
    evaluate_main(
        [
            "--cfg-path",
            str(cfg),
            "--checkpoint",
            str(trained_run / "checkpoints" / "best.pt"),
            "--options",
            "run.num_shots=[0]",
            "run.zero_shot_text_demos=false",
            "run.demo_split=val",
        ]
    )
    assert sorted(p.name for p in trained_run.iterdir()) == before
    assert (trained_run.parent / "eval_train_run_best" / "fewshot_table.json").is_file()


def test_a_failed_evaluation_leaves_no_run_directory(trained_run, shapes_root, tmp_path, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fewshot_eval, "evaluate_split", broken)
    cfg = eval_config(tmp_path / "eval.yaml", shapes_root, tmp_path / "evals")
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(trained_run)])
    assert not (tmp_path / "evals").exists() or not any((tmp_path / "evals").iterdir())


def test_an_existing_run_name_given_on_the_command_line_is_refused_with_evaluation_advice(
    trained_run, shapes_root, tmp_path, capsys
):
    cfg = eval_config(tmp_path / "eval.yaml", shapes_root, trained_run.parent)
    with pytest.raises(SystemExit):
        evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(trained_run), "--options", "run.run_name=run"])
    err = capsys.readouterr().err
    assert "never writes into an existing directory" in err and "resume_ckpt_path" not in err


def test_an_exported_peft_folder_and_openflamingo_checkpoint_evaluate_like_best_pt(trained_run, shapes_root, tmp_path):
    from lavis.export import export

    best = trained_run / "checkpoints" / "best.pt"
    cfg = eval_config(tmp_path / "eval.yaml", shapes_root, tmp_path / "evals")
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(best)])
    expected = table_score(tmp_path / "evals" / "eval_eval_run_best")
    has_lm_adapter = yaml.safe_load((trained_run / "config.yaml").read_text())["model"]["adapters"]["method"]
    if has_lm_adapter:
        export(str(best), str(tmp_path / "adapter"), "peft")
        evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(tmp_path / "adapter")])
        assert table_score(tmp_path / "evals" / "eval_eval_adapter") == expected
    release = export(str(best), str(tmp_path / "release"), "openflamingo")
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(release)])
    score = table_score(tmp_path / "evals" / "eval_eval_release_checkpoint")
    if not has_lm_adapter:  # nothing merged: the same weights exactly
        assert score == expected

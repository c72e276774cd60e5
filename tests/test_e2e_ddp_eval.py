"""Distributed evaluation equals one process exactly, and evaluation records must cover the split.

evaluate.py runs the tiny model (trained for two epochs, see conftest.trained_checkpoint) few-shot
on the shapes val split: 5 images (captions) and 25 questions (VQA), so two ranks with a
DistributedSampler get 3 + 3 and 13 + 13 samples, one of them a padding repeat that must be dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_JOINT_DECODING, check_ok, read_jsonl, run_entry, shapes_section, write_config
from toy_components import ToyModel, ToyRegressionDataset, ToyRegressionTask, make_cfg

from lavis.common import dist
from lavis.common.errors import DataError
from lavis.runners.evaluation import evaluate_split
from lavis.runners.precision import resolve_precision

pytestmark = pytest.mark.slow

SHOTS = [0, 2]


def evaluate(tmp_path: Path, shapes_root: Path, checkpoint: Path, nproc: int) -> Path:
    cfg = write_config(
        tmp_path / "eval.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root), "shapes_vqa": shapes_section(shapes_root)},
        run={
            "task": "caption_vqa",
            "device": "cpu",
            "test_splits": ["val"],
            "demo_split": "train",
            "num_shots": SHOTS,
            "num_trials": 1,
            "trial_seeds": [7],
            "num_samples": None,
            # A batch of 2 splits 5 samples unevenly, so rows are padded differently in the two runs.
            "batch_size_eval": 2,
            "metrics": ["CIDEr", "BLEU"],
            "output_dir": str(tmp_path / "out"),
            "run_name": f"np{nproc}",
            **FAST_JOINT_DECODING,
        },
    )
    check_ok(run_entry("evaluate.py", cfg, nproc=nproc, extra_args=["--checkpoint", str(checkpoint)]))
    return tmp_path / "out" / f"np{nproc}"


def sorted_results(path: Path, key: str) -> list[dict]:
    return sorted(json.loads(path.read_text()), key=lambda r: r[key])


def test_two_process_evaluation_equals_one_process_exactly(tmp_path, shapes_root, trained_checkpoint):
    single = evaluate(tmp_path, shapes_root, trained_checkpoint, nproc=1)
    double = evaluate(tmp_path, shapes_root, trained_checkpoint, nproc=2)

    # Identical metrics, every one of them, for every dataset and shot count.
    single_metrics, double_metrics = read_jsonl(single / "metrics.jsonl"), read_jsonl(double / "metrics.jsonl")
    assert len(single_metrics) == len(SHOTS) * 2
    assert single_metrics == double_metrics
    by_data = {(r["dataset"], r["shots"]): r for r in single_metrics}
    assert all(by_data[("shapes_caption", s)]["num_images"] == 5 for s in SHOTS)
    # The trained model scores above zero, so equal scores are not equal zeros.
    assert max(by_data[("shapes_vqa", s)]["overall"] for s in SHOTS) > 0
    assert max(by_data[("shapes_caption", s)]["CIDEr"] for s in SHOTS) > 0
    single_table = json.loads((single / "fewshot_table.json").read_text())
    assert single_table == json.loads((double / "fewshot_table.json").read_text())

    # Identical result files, each id exactly once (the sampler's repeats were dropped).
    val_images = 5
    for shots in SHOTS:
        for kind, key, count in (("caption", "image_id", val_images), ("vqa", "question_id", val_images * 5)):
            name = f"val_{shots}shot_trial0_{kind}_results.json"
            one, two = sorted_results(single / "results" / name, key), sorted_results(double / "results" / name, key)
            assert one == two, name
            assert len({r[key] for r in two}) == len(two) == count
            # The per-sample logs too: prompts, demonstrations and scores gathered from both ranks.
            samples = f"samples_shapes_{kind if kind == 'vqa' else 'caption'}_val_{shots}shot_trial0.jsonl"
            assert (single / samples).read_text() == (double / samples).read_text(), samples
    answers = {
        r["answer"] for r in sorted_results(single / "results" / "val_2shot_trial0_vqa_results.json", "question_id")
    }
    assert len(answers) > 1  # the answers depend on the question, so a mix-up of ids would show


class ClaimsAnExtraId(ToyRegressionDataset):
    """A dataset whose id list names a sample it never yields."""

    def sample_ids(self) -> list[int]:
        return [*self.ids, 999]


def test_evaluation_records_missing_an_id_fail_with_the_split_and_the_id(tmp_path):
    cfg = make_cfg(tmp_path)
    dist_info = dist.init_distributed("cpu")
    with pytest.raises(DataError) as err:
        evaluate_split(
            task=ToyRegressionTask(cfg),
            model=ToyModel(),
            dataset=ClaimsAnExtraId(7),
            dataset_name="toy",
            split="val",
            dist_info=dist_info,
            precision=resolve_precision("fp32", torch.device("cpu")),
            batch_size=3,
        )
    message = str(err.value)
    assert message.startswith("toy.val: evaluation records do not cover the split")
    assert "1 missing (e.g. [999])" in message and "7 ids predicted, 8 expected" in message


def test_check_coverage_names_missing_extra_and_repeated_ids():
    records = [{"question_id": i} for i in (1, 2, 2, 5)]
    with pytest.raises(DataError) as err:
        dist.check_coverage(records, "question_id", [1, 2, 3, 4], where="vqav2.val")
    message = str(err.value)
    assert "vqav2.val" in message and "'question_id'" in message
    assert "2 missing (e.g. [3, 4])" in message
    assert "1 not in the dataset (e.g. [5])" in message
    assert "1 repeated (e.g. [2])" in message
    # Exactly once each: no error; the padding repeats of a sampler are removed by dedup_records first.
    padded = [{"question_id": i} for i in (1, 2, 3, 4, 1)]
    dist.check_coverage(dist.dedup_records(padded, "question_id"), "question_id", [1, 2, 3, 4], where="x")

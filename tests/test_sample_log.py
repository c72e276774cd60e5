"""The per-sample log: the file API, and what a real few-shot evaluation writes (lmms-eval fields, scores)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import FAST_JOINT_DECODING, read_jsonl, shapes_section, write_config

from lavis.cli import evaluate_main
from lavis.common.errors import DataError
from lavis.runners import sample_log


def test_write_read_roundtrip_and_lmms_fields(tmp_path):
    path = tmp_path / sample_log.samples_filename("coco", sample_log.fewshot_tag("val", 4, 1))
    assert path.name == "samples_coco_val_4shot_trial1.jsonl"
    records = [
        sample_log.sample_record(
            7,
            input="<image>Output:",
            target=["a cat"],
            resps="a cat Output:",
            filtered_resps="a cat",
            image="/x.jpg",
            demo_ids=[1, 2],
            CIDEr=float("nan"),
        ),
        sample_log.sample_record("id-8", input="p", target=["b"], resps=None, filtered_resps="b"),
    ]
    sample_log.write_samples(path, records)
    back = sample_log.read_samples(path)
    assert [list(r)[:5] for r in back] == [list(sample_log.LMMS_FIELDS)] * 2
    assert back[0]["resps"] == [["a cat Output:"]] and back[0]["filtered_resps"] == ["a cat"]
    assert sample_log.prediction(back[0]) == "a cat" and sample_log.raw_response(back[0]) == "a cat Output:"
    assert back[0]["CIDEr"] is None  # NaN is not JSON: written as null
    assert back[1]["doc_id"] == "id-8" and sample_log.raw_response(back[1]) is None


def test_bad_records_are_refused_before_writing(tmp_path):
    path = tmp_path / "samples_x_val.jsonl"
    with pytest.raises(DataError, match="duplicate doc_id 3"):
        sample_log.write_samples(path, [{"doc_id": 3}, {"doc_id": 3}])
    with pytest.raises(DataError, match="record #1 has no 'doc_id'"):
        sample_log.write_samples(path, [{"doc_id": 3}, {"id": 4}])
    with pytest.raises(DataError, match="is not JSON"):
        sample_log.write_samples(path, [{"doc_id": 3, "x": object()}])
    assert not path.exists() and not list(tmp_path.iterdir())
    path.write_text('{"doc_id": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"samples_x_val.jsonl:2: not valid JSON"):
        sample_log.read_samples(path)


def test_file_names_parse_back():
    datasets = ["shapes", "shapes_vqa"]
    assert sample_log.parse_samples_filename("samples_shapes_vqa_val_2shot_trial0.jsonl", datasets) == {
        "dataset": "shapes_vqa",
        "tag": "val_2shot_trial0",
        "split": "val",
        "shots": 2,
        "trial": 0,
    }
    assert sample_log.parse_samples_filename("samples_shapes_test_step12.jsonl", datasets) == {
        "dataset": "shapes",
        "tag": "test_step12",
        "split": "test",
        "step": 12,
    }
    assert sample_log.parse_samples_filename("samples_other_val.jsonl", datasets) is None
    assert sample_log.parse_samples_filename("results.json", datasets) is None


@pytest.mark.slow
def test_fewshot_evaluation_writes_one_log_per_pass(tmp_path, shapes_root):
    shots, samples = [0, 2], 3
    cfg = write_config(
        tmp_path / "eval.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root), "shapes_vqa": shapes_section(shapes_root)},
        run={
            "task": "caption_vqa",
            "device": "cpu",
            "test_splits": ["val"],
            "demo_split": "train",
            "num_shots": shots,
            "num_trials": 2,
            "trial_seeds": [1, 2],
            "num_samples": samples,
            "batch_size_eval": 2,
            "metrics": ["CIDEr"],
            "output_dir": str(tmp_path / "out"),
            "run_name": "ev",
            **FAST_JOINT_DECODING,
        },
    )
    evaluate_main(["--cfg-path", str(cfg)])
    run_dir = tmp_path / "out" / "ev"
    metrics = {(m["dataset"], m["shots"], m["trial"]): m for m in read_jsonl(run_dir / "metrics.jsonl")}
    files = sorted(p.name for p in run_dir.glob("samples_*.jsonl"))
    assert files == sorted(
        f"samples_{d}_val_{s}shot_trial{t}.jsonl"
        for d in ("shapes_caption", "shapes_vqa")
        for s in shots
        for t in (0, 1)
    )
    for (dataset, shot, trial), m in metrics.items():
        rows = sample_log.read_samples(run_dir / f"samples_{dataset}_val_{shot}shot_trial{trial}.jsonl")
        assert len(rows) == samples and len({r["doc_id"] for r in rows}) == samples
        for row in rows:
            assert Path(row["image"]).is_file()
            assert row["input"].endswith("Output:" if dataset == "shapes_caption" else "Short answer:")
            assert isinstance(sample_log.raw_response(row), str)
            # 0-shot: OpenFlamingo's two text-only demonstrations, whose images are not shown.
            assert len(row["demo_ids"]) == (shot or 2)
            if shot:
                assert len(row["demo_images"]) == shot and all(Path(p).is_file() for p in row["demo_images"])
            else:
                assert row["demos_text_only"] is True and "demo_images" not in row
            assert row["input"].count("<image>") == shot + 1
            assert row["target"] and all(isinstance(t, str) for t in row["target"])
        if dataset == "shapes_caption":
            # The corpus CIDEr is the mean of the per-image CIDEr of the same computation.
            assert statistics.fmean(r["CIDEr"] for r in rows) == pytest.approx(m["CIDEr"], abs=1e-9)
            results = json.loads(
                (run_dir / "results" / f"val_{shot}shot_trial{trial}_caption_results.json").read_text()
            )
            assert {r["image_id"]: r["caption"] for r in results} == {
                r["doc_id"]: sample_log.prediction(r) for r in rows
            }
        else:
            assert statistics.fmean(r["vqa_accuracy"] for r in rows) == pytest.approx(m["overall"], abs=0.01)
            assert all({"question_type", "answer_type", "question"} <= set(r) for r in rows)
            assert all(len(r["target"]) == 10 for r in rows)
            results = json.loads((run_dir / "results" / f"val_{shot}shot_trial{trial}_vqa_results.json").read_text())
            assert {r["question_id"]: r["answer"] for r in results} == {
                r["doc_id"]: sample_log.prediction(r) for r in rows
            }

"""Few-shot evaluation through evaluate.py's entry point: the table, and reproducibility of the demos.

The runs are in-process (``lavis.cli.evaluate_main``, all that evaluate.py calls) so the test can
record, for every (shots, trial) pass, the demonstrations each query got and the prompt the model saw.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from conftest import FAST_DECODING, shapes_section, write_config

import lavis.runners.fewshot_eval as fewshot_eval
from lavis.cli import evaluate_main
from lavis.tasks.captioning import CaptioningTask

pytestmark = pytest.mark.slow

SHOTS = [0, 2, 4]


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def spy(monkeypatch):
    """Records ``{split tag: {"demos": [...], "prompts": {image_id: prompt}}}`` of every evaluation pass."""
    seen: dict = {}
    current: dict = {}
    real_evaluate_split, real_valid_step = fewshot_eval.evaluate_split, CaptioningTask.valid_step

    def evaluate_split(**kwargs):
        dataset = kwargs["dataset"]
        current["tag"] = kwargs["split"]
        seen[kwargs["split"]] = {
            "demos": [dataset.demo_indices(i) for i in range(len(dataset))],
            "ids": dataset.sample_ids(),
            "prompts": {},
        }
        return real_evaluate_split(**kwargs)

    def valid_step(self, model, batch):
        seen[current["tag"]]["prompts"].update(zip(batch["image_id"], batch["prompt"]))
        return real_valid_step(self, model, batch)

    monkeypatch.setattr(fewshot_eval, "evaluate_split", evaluate_split)
    monkeypatch.setattr(CaptioningTask, "valid_step", valid_step)
    return seen


def run_fewshot(
    tmp_path: Path, shapes_root: Path, checkpoint: Path, name: str, seeds: list[int], shots: list[int] = SHOTS
) -> Path:
    cfg = write_config(
        tmp_path / f"{name}.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root)},
        run={
            "task": "captioning",
            "device": "cpu",
            "test_splits": ["val"],
            "demo_split": "train",
            "num_shots": shots,
            "num_trials": len(seeds),
            "trial_seeds": seeds,
            "num_samples": 3,
            "batch_size_eval": 3,
            "metrics": ["CIDEr"],
            "output_dir": str(tmp_path / "out"),
            "run_name": name,
            **FAST_DECODING,
        },
    )
    evaluate_main(["--cfg-path", str(cfg), "--checkpoint", str(checkpoint)])
    return tmp_path / "out" / name


def test_fewshot_table_is_written_and_reproducible(tmp_path, shapes_root, trained_checkpoint, spy, one_thread):
    first = run_fewshot(tmp_path, shapes_root, trained_checkpoint, "first", seeds=[11, 12])
    first_seen = {tag: dict(v) for tag, v in spy.items()}
    spy.clear()
    again = run_fewshot(tmp_path, shapes_root, trained_checkpoint, "again", seeds=[11, 12])

    table = json.loads((first / "fewshot_table.json").read_text())
    assert table["model"] == str(trained_checkpoint)
    (row,) = table["rows"].values()
    assert list(table["rows"]) == ["shapes_caption/val"] and sorted(map(int, row)) == SHOTS
    for cell in row.values():
        assert len(cell["trials"]) == 2
        assert cell["mean"] == pytest.approx(statistics.fmean(cell["trials"]))
        assert cell["std"] == pytest.approx(statistics.pstdev(cell["trials"]))
    markdown = (first / "fewshot_table.md").read_text()
    assert "| 0-shot | 2-shot | 4-shot |" in markdown
    assert f"{row['4']['mean']:.2f} ± {row['4']['std']:.2f}" in markdown

    # The same seeds give the same table, the same demonstrations and the same prompts.
    assert json.loads((again / "fewshot_table.json").read_text()) == table
    assert (again / "fewshot_table.md").read_text() == markdown
    assert spy == first_seen
    for shots in SHOTS:
        tags = [f"val_{shots}shot_trial{t}" for t in (0, 1)]
        for tag in tags:
            demos = first_seen[tag]["demos"]
            # 0-shot uses OpenFlamingo's two text-only demonstrations.
            assert all(len(d) == (shots or 2) for d in demos), (tag, demos)
            assert all(len(set(d)) == len(d) for d in demos)
        # Trials draw different demonstrations for the same queries.
        assert first_seen[tags[0]]["ids"] == first_seen[tags[1]]["ids"]
        assert first_seen[tags[0]]["demos"] != first_seen[tags[1]]["demos"]
        assert first_seen[tags[0]]["prompts"] != first_seen[tags[1]]["prompts"]
    # Each prompt holds its demonstrations' captions before the query's own "<image>Output:".
    for tag, seen in first_seen.items():
        for prompt in seen["prompts"].values():
            assert prompt.endswith("<image>Output:") and prompt.count("<|endofchunk|>") == (int(tag[4]) or 2)


def test_another_trial_seed_changes_only_that_trials_demos(tmp_path, shapes_root, trained_checkpoint, spy, one_thread):
    run_fewshot(tmp_path, shapes_root, trained_checkpoint, "a", seeds=[11, 12], shots=[2])
    before = {tag: dict(v) for tag, v in spy.items()}
    spy.clear()
    run_fewshot(tmp_path, shapes_root, trained_checkpoint, "b", seeds=[11, 13], shots=[2])
    # The queries are drawn with the first seed, so they are the same; trial 0 keeps its seed.
    assert spy["val_2shot_trial0"] == before["val_2shot_trial0"]
    assert spy["val_2shot_trial1"]["ids"] == before["val_2shot_trial1"]["ids"]
    assert spy["val_2shot_trial1"]["demos"] != before["val_2shot_trial1"]["demos"]
    assert spy["val_2shot_trial1"]["prompts"] != before["val_2shot_trial1"]["prompts"]

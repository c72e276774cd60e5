"""Task-level pieces: answer/caption post-processing, joint caption+VQA batches, in-context training data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lavis.datasets.collators import CaptionCollator, VQACollator
from lavis.datasets.fewshot import InContextTrainingDataset
from lavis.datasets.mixed_collator import MixedCollator
from lavis.datasets.prompts import DEMOS_KEY, IGNORE_INDEX
from lavis.datasets.samples import SplitDataset
from lavis.metrics.postprocess import postprocess_answer, postprocess_caption
from lavis.models.flamingo.tokenizer import load_llama_tokenizer
from lavis.tasks.vqa import VQATask

FIXTURE = Path(__file__).parent / "fixtures" / "llama_tokenizer"
MEDIA = 641


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama_tokenizer(str(FIXTURE))


def caption_item(image_id, caption, value=0.0):
    return {"image": torch.full((3, 4, 4), value), "text_input": caption, "image_id": image_id}


def vqa_item(question_id, question, answer, value=0.0):
    return {
        "image": torch.full((3, 4, 4), value),
        "text_input": question,
        "answer": answer,
        "answers": [answer] * 10,
        "question_id": question_id,
        "image_id": 1000 + question_id,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A dog on a beach. Output: a cat", "A dog on a beach."),
        ('"A red circle."', "A red circle."),
        ("  two shapes ", "two shapes"),
    ],
)
def test_caption_postprocessing(raw, expected):
    assert postprocess_caption(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("red Question: what", "red"),
        ("yes Answer: no", "yes"),
        ("2 Short answer: 3", "2"),
        ("left, right", "left"),
        (" blue ", "blue"),
    ],
)
def test_answer_postprocessing(raw, expected):
    assert postprocess_answer(raw) == expected


def test_mixed_training_batch_pads_both_kinds_to_one_length(tokenizer):
    collate = MixedCollator(
        CaptionCollator(tokenizer, "train"), VQACollator(tokenizer, "train"), tokenizer.pad_token_id
    )
    items = [caption_item(1, "a red circle in the center of the picture.", 1.0), vqa_item(7, "what color?", "red", 2.0)]
    batch = collate(items)
    alone = [CaptionCollator(tokenizer, "train")(items[:1]), VQACollator(tokenizer, "train")(items[1:])]
    length = max(b["lang_x"].shape[1] for b in alone)
    assert batch["lang_x"].shape == (2, length) and batch["vision_x"].shape == (2, 1, 1, 3, 4, 4)
    for row, single in enumerate(alone):
        n = single["lang_x"].shape[1]
        assert torch.equal(batch["lang_x"][row, :n], single["lang_x"][0])
        assert torch.equal(batch["labels"][row, :n], single["labels"][0])
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][row, n:] == 0).all()
    assert batch["vision_x"][0].eq(1.0).all() and batch["vision_x"][1].eq(2.0).all()


def test_mixed_eval_batches_go_to_their_own_collator(tokenizer):
    collate = MixedCollator(CaptionCollator(tokenizer, "eval"), VQACollator(tokenizer, "eval"), tokenizer.pad_token_id)
    assert collate([vqa_item(3, "what shape?", "circle")])["question_id"] == [3]
    assert collate([caption_item(5, "x")])["image_id"] == [5]


class Items(SplitDataset):
    sample_id_key = "image_id"

    def __init__(self, items):
        self.items = items
        self.num_skipped = 4

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def test_in_context_training_adds_0_to_k_demos_reproducibly_never_the_sample_itself(tokenizer):
    data = Items([caption_item(i // 2, f"caption {i}.", float(i)) for i in range(20)])
    wrapped = InContextTrainingDataset(data, max_shots=3, seed=5)
    first = [wrapped[i] for i in range(len(wrapped))]
    again = [InContextTrainingDataset(data, 3, 5)[i] for i in range(len(wrapped))]
    counts = [len(item[DEMOS_KEY]) for item in first]
    assert set(counts) == {0, 1, 2, 3}
    assert [[d["text_input"] for d in a[DEMOS_KEY]] for a in first] == [
        [d["text_input"] for d in b[DEMOS_KEY]] for b in again
    ]
    for item in first:
        assert all(d["image_id"] != item["image_id"] for d in item[DEMOS_KEY])
    assert wrapped.num_skipped == 4  # the runner still sees the wrapped dataset's counters

    # Rows with different numbers of demos share a batch: each row's images are its demos then itself,
    # padded with zero images, and only the sample's own caption is labelled.
    rows = [first[counts.index(0)], first[counts.index(3)]]
    batch = CaptionCollator(tokenizer, "train")(rows)
    assert batch["vision_x"].shape[1] == 4
    assert (batch["lang_x"][0] == MEDIA).sum() == 1 and (batch["lang_x"][1] == MEDIA).sum() == 4
    assert batch["vision_x"][0, 1:].eq(0).all()
    assert batch["vision_x"][0, 0].eq(rows[0]["image"][0, 0, 0]).all()
    labelled = batch["lang_x"][1][batch["labels"][1] != IGNORE_INDEX]
    assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == rows[1]["text_input"]


def test_vqa_split_without_answers_writes_results_and_scores_nothing(tmp_path):
    task = VQATask(OmegaConf.create({"run": {"always_normalize": False}}))

    class TestDev:
        annotation_file = None
        question_file = None

    metrics = task.evaluate([{"question_id": 1, "answer": "yes"}], "test", TestDev(), tmp_path)
    assert metrics == {"agg_metrics": None, "num_answers": 1}
    assert (tmp_path / "test_vqa_results.json").read_text().startswith("[")


def test_agg_metric_must_be_a_score_of_the_chosen_metrics():
    from lavis.common.errors import ConfigError
    from lavis.common.schema import config_instance
    from lavis.tasks.captioning import CaptioningTask

    run = {"metrics": ["CIDEr", "BLEU"], "agg_metric": "Bleu_4"}
    assert config_instance(CaptioningTask.Config, run, "run").agg_metric == "Bleu_4"
    with pytest.raises(ConfigError, match=r"run.agg_metric: 'BLEU' is not a score of run.metrics .*Bleu_4"):
        config_instance(CaptioningTask.Config, {**run, "agg_metric": "BLEU"}, "run")
    with pytest.raises(ConfigError, match=r"run.metrics: unknown caption metric 'CIDER2'"):
        config_instance(CaptioningTask.Config, {**run, "metrics": ["CIDER2"]}, "run")


def test_evaluating_a_checkpoint_builds_the_adapters_it_was_trained_with(tmp_path):
    from lavis.cli import adopt_checkpoint_structure
    from lavis.common.config import load_config
    from lavis.runners.checkpoint import save_checkpoint

    repo = Path(__file__).resolve().parent.parent
    trained = load_config(repo / "configs/demo/shapes_train.yaml")
    path = save_checkpoint(tmp_path / "step.pt", {"model": {}, "config": OmegaConf.to_container(trained)})
    cfg = load_config(repo / "configs/demo/shapes_eval.yaml")
    assert cfg.model.adapters.method is None  # the eval config describes the plain pretrained model
    adopt_checkpoint_structure(cfg, str(path))
    assert cfg.model.adapters == trained.model.adapters and cfg.model.trainable == trained.model.trainable


def test_scoring_a_caption_split_without_ground_truth_says_which_key_to_set():
    from lavis.common.errors import DataError
    from lavis.tasks.captioning import CaptioningTask

    task = CaptioningTask(OmegaConf.create({"run": {"metrics": ["CIDEr"], "agg_metric": "CIDEr"}}))

    class DemoPool:
        annotation_file = None

    with pytest.raises(DataError, match=r"build_info\.annotations\.train"):
        task.evaluate([{"image_id": 1, "caption": "a red circle."}], "train", DemoPool())

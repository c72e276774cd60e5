"""Rank classification on the tiny model: the task's cached scores equal scoring every class from scratch,
prompt ensembling, the v2 zero-shot compat switch, and the VQA task's protocol switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_flamingo_scoring import from_scratch, tiny_model

import lavis.datasets  # noqa: F401 - registers the builders
from lavis.datasets.fewshot import FewShotDataset
from lavis.tasks.classification import ClassificationTask
from lavis.tasks.vqa import VQATask

torch.set_num_threads(1)
SMALL_VIS = {
    "train": {"name": "clip_image_eval", "image_size": 64},
    "eval": {"name": "clip_image_eval", "image_size": 64},
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory) -> Path:
    from lavis.datasets.builders.shapes_suite import SuiteOptions, ensure_suite

    return ensure_suite(SuiteOptions(root=str(tmp_path_factory.mktemp("suite") / "s"), num_images=60))


def task_and_data(suite_root: Path, name: str, split: str, **run):
    cfg = OmegaConf.create(
        {
            "run": {
                "classification_prompt_ensembling": False,
                "compat_openflamingo_v2_zero_shot_classification": False,
                "score_batch_size": 5,
                **run,
            }
        }
    )
    task = ClassificationTask(cfg)
    section = {
        "splits": ["train", split],
        "vis_processor": SMALL_VIS,
        "suite": {"root": str(suite_root), "num_images": 60},
    }
    data = task.build_datasets({f"shapes_{name}": section})[f"shapes_{name}"]
    return task, data


@pytest.mark.parametrize("name,split", [("hateful_memes", "dev"), ("imagenet", "val")])
def test_task_scores_equal_scoring_every_class_from_scratch(model, suite_root, name, split):
    task, data = task_and_data(suite_root, name, split)
    fewshot = FewShotDataset(data[split], data["train"], num_shots=2, seed=0)
    batch = task.collator(model, "eval")([fewshot[i] for i in range(3)])
    records = task.valid_step(model, batch)
    conts = task.class_token_ids(model.tokenizer, f"shapes_{name}")
    want = from_scratch(model, batch["vision_x"], batch["lang_x"], batch["attention_mask"], conts, True)
    got = torch.tensor([r["class_logprobs"] for r in records])
    assert got.shape == (3, len(task.class_sets[f"shapes_{name}"].names))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [r["label"] for r in records] == batch["label"]


def test_prompt_ensembling_averages_over_demo_orders(model, suite_root):
    task, data = task_and_data(suite_root, "hateful_memes", "dev", classification_prompt_ensembling=True)
    fewshot = FewShotDataset(data["dev"], data["train"], num_shots=3, seed=0)
    items = [fewshot[i] for i in range(2)]
    batch = task.collator(model, "eval")(items)
    assert len(batch["views"]) == 5  # min(6, 3!) orders: the drawn one and 5 others
    prompts = {tuple(batch["prompt"])} | {tuple(v["prompt"]) for v in batch["views"]}
    assert len(prompts) == 6
    conts = task.class_token_ids(model.tokenizer, "shapes_hateful_memes")
    views = [batch, *batch["views"]]
    want = torch.stack(
        [from_scratch(model, v["vision_x"], v["lang_x"], v["attention_mask"], conts, True) for v in views]
    ).mean(0)
    got = torch.tensor([r["class_logprobs"] for r in task.valid_step(model, batch)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_shot_compat_switch_gives_the_query_the_first_demos_image(model, suite_root):
    for compat in (False, True):
        task, data = task_and_data(
            suite_root, "hateful_memes", "dev", compat_openflamingo_v2_zero_shot_classification=compat
        )
        assert task.text_demos_keep_images is compat
        fewshot = FewShotDataset(
            data["dev"],
            data["train"],
            num_shots=0,
            seed=0,
            zero_shot_text_demos=True,
            text_demos_keep_images=task.text_demos_keep_images,
        )
        item = fewshot[0]
        # Without the compat mode the text-only demonstrations' images are not even read.
        assert all((demo["image"] is None) is not compat for demo in item["demos"])
        batch = task.collator(model, "eval")([item])
        assert batch["lang_x"][0].tolist().count(model.media_token_id) == 1  # demos' <image> tags stripped
        assert batch["vision_x"].shape[1] == 1
        expected = item["demos"][0]["image"] if compat else item["image"]
        assert torch.equal(batch["vision_x"][0, 0, 0], expected)


def test_vqa_task_protocol_switches(tmp_path):
    texts = [" Shortstop", " baseball, softball", " riding horses\nQuestion:What"]
    default = VQATask(OmegaConf.create({"run": {}}))
    assert default.postprocess(texts) == ["", "baseball", "riding horses"]
    v2 = VQATask(OmegaConf.create({"run": {"vqa_postprocess": "openflamingo_v2"}}))
    assert v2.postprocess(texts) == [" ", " baseball", " riding horses\n"]
    try:
        okvqa = VQATask(OmegaConf.create({"run": {"vqa_postprocess": "openflamingo_v2", "vqa_stemmer": "okvqa"}}))
        assert okvqa.postprocess(texts) == ["", "baseball", "ride horse"]
    except Exception as err:  # noqa: BLE001
        from lavis.metrics.nltk_data import MissingNltkDataError

        if not isinstance(err, MissingNltkDataError):
            raise
        pytest.skip(f"OK-VQA stemmer data not installed: {err}")

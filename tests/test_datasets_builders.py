"""coco_caption and vqav2 builders on small official-format files written by the test."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lavis.common.config import load_config, read_yaml
from lavis.common.errors import ConfigError, DataError
from lavis.common.registry import registry
from lavis.datasets.builders.vqav2 import most_frequent_answer
from lavis.runners.fewshot_eval import splits_to_evaluate

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)

EVAL_VIS = {
    "train": {"name": "clip_image_eval", "image_size": 16},
    "eval": {"name": "clip_image_eval", "image_size": 16},
}


def _image(path: Path, color=(200, 30, 30), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_coco(root: Path) -> dict:
    """Karpathy file (train/restval/val/test, 2 captions each), official captions_val2014.json, images."""
    images, gt_images, gt_anns = [], [], []
    plan = [(1, "train"), (2, "train"), (3, "restval"), (4, "val"), (5, "val"), (6, "test")]
    for cocoid, split in plan:
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        _image(root / "images" / folder / name, color=(cocoid * 40, 10, 10))
        sentences = [
            {"raw": f"  a  photo of   thing {cocoid} ", "tokens": []},
            {"raw": f"picture {cocoid}", "tokens": []},
        ]
        images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split, "sentences": sentences})
        if folder == "val2014":
            gt_images.append({"id": cocoid, "file_name": name})
            gt_anns += [
                {"image_id": cocoid, "id": cocoid * 10 + k, "caption": s["raw"]} for k, s in enumerate(sentences)
            ]
    (root / "ann").mkdir(parents=True, exist_ok=True)
    (root / "ann" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (root / "ann" / "captions_val2014.json").write_text(json.dumps({"images": gt_images, "annotations": gt_anns}))
    gt = str(root / "ann" / "captions_val2014.json")
    return {
        "images": str(root / "images"),
        "karpathy_file": str(root / "ann" / "dataset_coco.json"),
        "annotations": {"val": gt, "test": gt},
    }


def _answers(*words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def write_vqa(root: Path) -> dict:
    """Train questions with annotations (one with a tie) and test-dev questions without annotations."""
    for image_id, subtype in ((7, "train2014"), (8, "train2014"), (9, "test2015")):
        _image(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg")
    questions = [
        {"image_id": 7, "question": "what color is it", "question_id": 70},
        {"image_id": 7, "question": "how many?", "question_id": 71},
        {"image_id": 8, "question": "is it red?", "question_id": 80},
    ]
    annotations = [
        {"question_id": 70, "image_id": 7, "answers": _answers(*(["red"] * 6 + ["blue"] * 4))},
        # tie between "2" and "two": the first in annotation order wins
        {"question_id": 71, "image_id": 7, "answers": _answers(*(["two", "2"] * 5))},
        {"question_id": 80, "image_id": 8, "answers": _answers(*(["no"] * 3 + ["yes"] * 7))},
    ]
    q = {"data_subtype": "train2014", "task_type": "Open-Ended", "questions": questions}
    (root / "q_train.json").write_text(json.dumps(q))
    (root / "a_train.json").write_text(json.dumps({"data_subtype": "train2014", "annotations": annotations}))
    test_q = {"data_subtype": "test2015", "questions": [{"image_id": 9, "question": "what?", "question_id": 90}]}
    (root / "q_test.json").write_text(json.dumps(test_q))
    return {
        "train": {
            "questions": str(root / "q_train.json"),
            "annotations": str(root / "a_train.json"),
            "images": str(root / "train2014"),
        },
        "test": {"questions": str(root / "q_test.json"), "annotations": None, "images": str(root / "test2015")},
    }


def build(name, **section):
    section.setdefault("vis_processor", EVAL_VIS)
    return registry.get("builder", name)(section).build_datasets()


def test_coco_caption_karpathy_splits_and_items(tmp_path):
    info = write_coco(tmp_path)
    ds = build("coco_caption", build_info=info, splits=["train", "val", "test"])
    train = ds["train"]
    # one sample per (image, caption) over train + restval images
    assert len(train) == 3 * 2
    assert sorted(train.sample_ids()) == [1, 2, 3]
    item = train[0]
    assert item["text_input"] == "a photo of thing 1"  # whitespace collapsed and stripped
    assert item["image_id"] == 1 and item["image"].shape == (3, 16, 16)
    assert train.sample_id_key == "image_id"
    # eval: one sample per image, ground truth exposed for scoring
    assert [it["image_id"] for it in ds["val"]] == [4, 5]
    assert ds["val"].annotation_file == info["annotations"]["val"]
    assert ds["val"][1]["captions"] == ["a photo of thing 5", "picture 5"]
    assert ds["test"].sample_ids() == [6]


def test_coco_caption_restval_is_configurable(tmp_path):
    info = write_coco(tmp_path)
    ds = build("coco_caption", build_info=info, splits=["train"], train_includes_restval=False)
    assert ds["train"].sample_ids() == [1, 2]


def test_vqav2_joins_questions_and_answers(tmp_path):
    info = write_vqa(tmp_path)
    ds = build("vqav2", build_info=info, splits=["train", "test"])
    train = ds["train"]
    items = {it["question_id"]: it for it in (train[i] for i in range(len(train)))}
    assert set(items) == {70, 71, 80}
    assert items[70]["answer"] == "red" and len(items[70]["answers"]) == 10
    assert items[71]["answer"] == "two"  # tie -> first in annotation order
    assert items[80]["answer"] == "yes"
    assert items[70]["text_input"] == "what color is it?"  # trailing question mark added
    assert items[71]["text_input"] == "how many?"
    assert train.sample_id_key == "question_id" and train.question_file == info["train"]["questions"]
    test = ds["test"]
    assert test.annotation_file is None and test.question_file == info["test"]["questions"]
    assert test[0]["answers"] == [] and test[0]["answer"] == "" and test[0]["image_id"] == 9


def test_most_frequent_answer():
    assert most_frequent_answer(["a", "b", "b", "a", "c"]) == "a"
    assert most_frequent_answer(["c", "b", "b"]) == "b"
    assert most_frequent_answer([]) == ""


def test_max_samples_caps_each_split(tmp_path):
    info = write_coco(tmp_path)
    ds = build("coco_caption", build_info=info, splits=["train", "val"], max_samples=1)
    assert len(ds["train"]) == 1 and ds["val"].sample_ids() == [4]


def test_unknown_key_and_processor_are_config_errors(tmp_path):
    info = write_coco(tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.coco_caption\.on_bad_sampel.*on_bad_sample"):
        registry.get("builder", "coco_caption")({"build_info": info, "on_bad_sampel": "skip"})
    bad_vis = {"train": {"name": "clip_image_evil"}, "eval": {"name": "clip_image_eval", "imagesize": 3}}
    with pytest.raises(ConfigError, match="clip_image_eval"):
        build("coco_caption", build_info=info, splits=["train"], vis_processor=bad_vis)
    with pytest.raises(ConfigError, match=r"vis_processor\.eval\.imagesize"):
        build("coco_caption", build_info=info, splits=["val"], vis_processor=bad_vis)


def test_coco_caption_eval_split_without_ground_truth_is_a_demo_pool(tmp_path):
    # Karpathy train as an eval-role split (few-shot demos): restval images are val2014 images, absent from
    # any train ground truth, so no ground-truth file is asked for; references are the Karpathy sentences.
    info = write_coco(tmp_path)
    ds = build("coco_caption", build_info=info, splits=["train", "test"], train_splits=[])
    pool = ds["train"]
    assert pool.annotation_file is None and pool.sample_format.name == "caption_eval"
    assert pool.sample_ids() == [1, 2, 3]  # restval image 3 included, one sample per image
    assert pool[2]["captions"] == ["a photo of thing 3", "picture 3"]
    assert ds["test"].annotation_file == info["annotations"]["test"]
    # Without a ground-truth file the sentences are the only references: an image without any is refused.
    doc = json.loads(Path(info["karpathy_file"]).read_text())
    doc["images"][0]["sentences"] = []
    Path(info["karpathy_file"]).write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"dataset_coco\.json: image cocoid 1 of split 'train' has no sentences"):
        build("coco_caption", build_info=info, splits=["train"], train_splits=[])


def test_shipped_fewshot_caption_config_builds_its_demo_pool_and_refuses_to_score_without_ground_truth(
    tmp_path, monkeypatch
):
    # The data root laid out as lavis/configs/datasets/coco_caption/defaults.yaml expects it (no train GT).
    write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "ann").rename(tmp_path / "coco" / "annotations")
    monkeypatch.setenv("PETVLM_DATA", str(tmp_path))
    cfg = load_config(
        REPO / "configs/projects/peft_flamingo/eval/caption_coco_fewshot.yaml",
        ["datasets.coco_caption.vis_processor.eval.image_size=16"],
    )
    section = cfg.datasets.coco_caption
    section.train_splits = []  # as evaluate.py sets it: demos are shown as at test time
    assert "train" not in section.build_info.annotations
    datasets = {"coco_caption": registry.get("builder", "coco_caption")(section).build_datasets()}
    assert datasets["coco_caption"]["train"].annotation_file is None
    assert datasets["coco_caption"]["train"].sample_ids() == [1, 2, 3]
    assert splits_to_evaluate(cfg.run, datasets) == ["test"]  # the scored split has its ground truth
    # Scoring a split that has none is refused before any generation, naming the key to set.
    run = OmegaConf.merge(cfg.run, {"test_splits": ["train"]})
    with pytest.raises(
        ConfigError,
        match=r"datasets\.coco_caption\.build_info\.annotations\.train: split 'train' "
        r"is evaluated .* no ground-truth captions file",
    ):
        splits_to_evaluate(run, datasets)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "lavis" / "configs" / "datasets"


@pytest.mark.parametrize("builder", sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()))
def test_default_yaml_validates_and_uses_the_data_root(builder, monkeypatch, tmp_path):
    path = CONFIG_DIR / builder / "defaults.yaml"
    text = path.read_text()
    assert "/home/" not in text and "/work/" not in text
    monkeypatch.setenv("PETVLM_DATA", str(tmp_path / "root"))
    section = OmegaConf.to_container(read_yaml(path), resolve=True)["datasets"][builder]
    cfg = registry.get("builder", builder)(section).cfg
    paths = [v for v in _strings(dataclasses.asdict(cfg)) if os.sep in v]
    assert paths and all(p.startswith(str(tmp_path / "root")) for p in paths)


def _strings(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _strings(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _strings(v)
    elif isinstance(tree, str):
        yield tree

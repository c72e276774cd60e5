"""The suite's builders read their official formats (via the synthetic stand-ins) and refuse bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lavis.datasets  # noqa: F401 - registers the builders
from lavis.common.config import load_config
from lavis.common.errors import DataError
from lavis.common.preflight import missing_files, raw_config
from lavis.common.registry import registry

SMALL_VIS = {
    "train": {"name": "clip_image_eval", "image_size": 16},
    "eval": {"name": "clip_image_eval", "image_size": 16},
}
SPLITS = {"flickr30k": ["train", "test"], "hateful_memes": ["train", "dev"]}
NAMES = ["flickr30k", "okvqa", "textvqa", "vizwiz", "hateful_memes", "imagenet"]


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("suite") / "stand_ins"


def stand_in(name: str, root: Path, **extra):
    section = {
        "splits": SPLITS.get(name, ["train", "val"]),
        "vis_processor": SMALL_VIS,
        "suite": {"root": str(root), "num_images": 60},
        **extra,
    }
    return registry.get("builder", f"shapes_{name}")(section).build_datasets()


@pytest.mark.parametrize("name", NAMES)
def test_stand_in_is_read_by_the_official_reader(name, suite_root):
    datasets = stand_in(name, suite_root)
    evaluated = datasets[SPLITS.get(name, ["train", "val"])[1]]
    item = evaluated[0]
    assert item["image"].shape == (3, 16, 16)
    keys = {
        "flickr30k": {"image_id", "captions"},
        "hateful_memes": {"id", "label", "class_name", "text_input"},
        "imagenet": {"id", "label", "class_name"},
    }.get(name, {"question_id", "answers", "text_input"})
    assert keys <= set(item)
    assert len(evaluated.sample_ids()) == len(evaluated)


def test_stand_in_formats_keep_the_quirks(suite_root):
    stand_in("vizwiz", suite_root)
    vizwiz = json.loads((suite_root / "vizwiz" / "val_annotations_vqa_format.json").read_text())["annotations"]
    assert all("answer_id" not in a for ann in vizwiz for a in ann["answers"])
    assert any(ann["answers"][0]["answer"] == "unanswerable" for ann in vizwiz)
    textvqa = json.loads((suite_root / "textvqa" / "val_annotations_vqa_format.json").read_text())["annotations"]
    assert {ann["question_type"] for ann in textvqa} == {"none of the above"}
    assert all("answer_type" not in ann for ann in textvqa)
    memes = [json.loads(line) for line in (suite_root / "hateful_memes" / "dev.jsonl").open()]
    assert set(memes[0]) == {"id", "img", "label", "text"} and {m["label"] for m in memes} == {0, 1}


def _flickr_files(tmp_path: Path, images: list[dict]) -> dict:
    (tmp_path / "img").mkdir()
    for image in images:
        (tmp_path / "img" / image["filename"]).write_bytes(b"")
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    return {"images": str(tmp_path / "img"), "karpathy_file": str(tmp_path / "k.json")}


def test_flickr30k_refuses_a_non_numeric_file_name(tmp_path):
    info = _flickr_files(
        tmp_path, [{"filename": "abc.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a dog."}]}]
    )
    builder = registry.get("builder", "flickr30k")({"splits": ["test"], "build_info": info, "vis_processor": SMALL_VIS})
    with pytest.raises(DataError, match="abc.jpg.*not a numeric image id"):
        builder.build_datasets()


def test_flickr30k_refuses_a_record_without_sentences(tmp_path):
    info = _flickr_files(tmp_path, [{"filename": "1.jpg", "imgid": 0, "split": "test"}])
    builder = registry.get("builder", "flickr30k")({"splits": ["test"], "build_info": info, "vis_processor": SMALL_VIS})
    with pytest.raises(DataError, match=r"images\[0\] lacks field\(s\) sentences"):
        builder.build_datasets()


def test_hateful_memes_refuses_bad_lines(tmp_path):
    (tmp_path / "dev.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 2, "text": "x"}\n')
    section = {
        "splits": ["dev"],
        "vis_processor": SMALL_VIS,
        "build_info": {"images": str(tmp_path), "annotations": {"dev": str(tmp_path / "dev.jsonl")}},
    }
    with pytest.raises(DataError, match="line 1 .*label 2; expected 0 or 1"):
        registry.get("builder", "hateful_memes")(section).build_datasets()
    (tmp_path / "dev.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 1, "text": "x"}\n{"id": 2,\n')
    with pytest.raises(DataError, match="dev.jsonl:2: not valid JSON"):
        registry.get("builder", "hateful_memes")(section).build_datasets()


def test_imagenet_refuses_class_names_that_do_not_match_the_folders(tmp_path):
    for folder in ("n001", "n002"):
        (tmp_path / "val" / folder).mkdir(parents=True)
        (tmp_path / "val" / folder / "a.png").write_bytes(b"")
    section = {"splits": ["val"], "vis_processor": SMALL_VIS, "root": str(tmp_path), "classnames": ["cat"]}
    with pytest.raises(DataError, match="2 class folders but 1 class names"):
        registry.get("builder", "imagenet")(section).build_datasets()


def test_vizwiz_question_without_annotation_is_refused(tmp_path):
    (tmp_path / "q.json").write_text(
        json.dumps({"questions": [{"image_id": "a.jpg", "question": "q", "question_id": 1}]})
    )
    (tmp_path / "a.json").write_text(json.dumps({"annotations": []}))
    section = {
        "splits": ["val"],
        "vis_processor": SMALL_VIS,
        "build_info": {
            "val": {
                "questions": str(tmp_path / "q.json"),
                "annotations": str(tmp_path / "a.json"),
                "images": str(tmp_path),
                "image_name_format": "{image_id}",
            }
        },
    }
    with pytest.raises(DataError, match="question_id 1 has no annotation"):
        registry.get("builder", "vizwiz")(section).build_datasets()


@pytest.mark.parametrize("name", NAMES)
def test_preflight_names_every_missing_default_file(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PETVLM_DATA", str(tmp_path / "nowhere"))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        # The tiny model's vision tower takes 64 px images (the datasets' defaults are 224 px).
        f"model: {{arch: openflamingo, model_type: tiny}}\ndatasets: {{{name}: {{vis_processor: "
        "{train: {image_size: 64}, eval: {image_size: 64}}}}\nrun: {task: vqa}\n"
    )
    _, problems = missing_files(load_config(cfg_path), raw_config(cfg_path, []))
    assert problems and all("nowhere" in p and "PETVLM_DATA" in p for p in problems), problems

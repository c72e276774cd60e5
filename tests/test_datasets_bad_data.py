"""Bad data: every case gives a DataError naming the file and the record; skip replaces and counts."""

import json
import logging
import os

import pytest
import torch
from test_datasets_builders import EVAL_VIS, write_coco, write_vqa

from lavis.common.errors import DataError
from lavis.common.registry import registry
from lavis.datasets import pack_shards, shards
from lavis.datasets.samples import CAPTION_EVAL, CAPTION_TRAIN

torch.set_num_threads(1)


def build(name, info, **extra):
    return registry.get("builder", name)({"build_info": info, "vis_processor": EVAL_VIS, **extra}).build_datasets()


def test_missing_image_is_found_when_building(tmp_path):
    info = write_coco(tmp_path)
    missing = tmp_path / "images" / "train2014" / "COCO_train2014_000000000002.jpg"
    missing.unlink()
    with pytest.raises(
        DataError, match=r"(?s)coco_caption/train: 1 image file\(s\) not found.*000000000002\.jpg \(image_id=2\)"
    ):
        build("coco_caption", info, splits=["train"])


def test_vqa_image_id_not_in_the_image_folder(tmp_path):
    info = write_vqa(tmp_path)
    (tmp_path / "train2014" / "COCO_train2014_000000000008.jpg").unlink()
    with pytest.raises(DataError, match=r"(?s)COCO_train2014_000000000008\.jpg \(image_id=8\)"):
        build("vqav2", info, splits=["train"])


def test_annotation_file_not_json(tmp_path):
    info = write_coco(tmp_path)
    with open(info["karpathy_file"], "a") as handle:
        handle.write("\n{oops")
    with pytest.raises(DataError, match=r"dataset_coco\.json: not valid JSON .*line 2"):
        build("coco_caption", info, splits=["train"])


def test_annotation_file_missing(tmp_path):
    info = write_vqa(tmp_path)
    info["train"]["annotations"] = str(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"VQA annotations file not found: .*nope\.json"):
        build("vqav2", info, splits=["train"])


def test_record_lacking_a_field(tmp_path):
    info = write_coco(tmp_path)
    doc = json.loads(open(info["karpathy_file"]).read())
    del doc["images"][2]["sentences"]
    open(info["karpathy_file"], "w").write(json.dumps(doc))
    with pytest.raises(DataError, match=r"dataset_coco\.json: images\[2\] \(cocoid 3\) lacks field\(s\) sentences"):
        build("coco_caption", info, splits=["val"])
    info = write_vqa(tmp_path / "v")
    doc = json.loads(open(info["train"]["annotations"]).read())
    del doc["annotations"][1]["answers"][4]["answer"]
    open(info["train"]["annotations"], "w").write(json.dumps(doc))
    with pytest.raises(DataError, match=r"a_train\.json: annotations\[1\] \(question_id 71\) answers\[4\] lacks"):
        build("vqav2", info, splits=["train"])


def test_question_without_annotation(tmp_path):
    info = write_vqa(tmp_path)
    doc = json.loads(open(info["train"]["annotations"]).read())
    doc["annotations"] = [a for a in doc["annotations"] if a["question_id"] != 80]
    open(info["train"]["annotations"], "w").write(json.dumps(doc))
    with pytest.raises(DataError, match=r"q_train\.json: question_id 80 has no annotation in .*a_train\.json"):
        build("vqav2", info, splits=["train"])


def test_eval_image_missing_from_ground_truth(tmp_path):
    info = write_coco(tmp_path)
    doc = json.loads(open(info["annotations"]["val"]).read())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 5]
    open(info["annotations"]["val"], "w").write(json.dumps(doc))
    with pytest.raises(DataError, match=r"cocoid 5 of split 'val' has no caption in the ground-truth file"):
        build("coco_caption", info, splits=["val"])


def test_empty_split(tmp_path):
    info = write_vqa(tmp_path)
    doc = json.loads(open(info["train"]["questions"]).read())
    doc["questions"] = []
    open(info["train"]["questions"], "w").write(json.dumps(doc))
    with pytest.raises(DataError, match=r"vqav2/train: the split is empty .*q_train\.json"):
        build("vqav2", info, splits=["train"])
    coco = write_coco(tmp_path / "c")
    doc = json.loads(open(coco["karpathy_file"]).read())
    doc["images"] = [i for i in doc["images"] if i["split"] != "test"]
    open(coco["karpathy_file"], "w").write(json.dumps(doc))
    with pytest.raises(DataError, match=r"dataset_coco\.json: the Karpathy split 'test' is empty"):
        build("coco_caption", coco, splits=["test"])


def _corrupt(tmp_path, image_id=2):
    (tmp_path / "images" / "train2014" / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(b"not a jpeg at all")


def test_unreadable_image_raises_with_error_policy(tmp_path):
    info = write_coco(tmp_path)
    _corrupt(tmp_path)
    train = build("coco_caption", info, splits=["train"])["train"]
    train[0]  # good samples still load
    with pytest.raises(DataError, match=r"COCO_train2014_000000000002\.jpg \(image_id=2\): cannot read image"):
        train[2]


def test_skip_policy_replaces_deterministically_and_counts(tmp_path, caplog):
    info = write_coco(tmp_path)
    _corrupt(tmp_path)
    train = build("coco_caption", info, splits=["train"], on_bad_sample="skip")["train"]
    with caplog.at_level(logging.WARNING):
        items = [train[i] for i in range(len(train))]
    assert len(items) == len(train) == 6  # the epoch keeps its size
    # image 2's two captions (indices 2, 3) are replaced by the next readable sample (index 4, image 3)
    assert [it["image_id"] for it in items] == [1, 1, 3, 3, 3, 3]
    assert train.num_skipped == 2
    # every failed read is logged with its file (index 3 fails again while standing in for index 2)
    assert sum("000000000002.jpg" in r.getMessage() for r in caplog.records) == 3


def test_skip_count_is_visible_from_dataloader_workers(tmp_path):
    info = write_coco(tmp_path)
    _corrupt(tmp_path)
    train = build("coco_caption", info, splits=["train"], on_bad_sample="skip")["train"]
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2, collate_fn=list)
    assert sum(len(batch) for batch in loader) == 6
    assert train.num_skipped == 2


def test_all_bad_is_an_error_not_an_empty_epoch(tmp_path):
    info = write_coco(tmp_path)
    for image_id in (1, 2, 3):
        _corrupt(tmp_path, image_id)
    train = build("coco_caption", info, splits=["train"], on_bad_sample="skip")["train"]
    with pytest.raises(DataError, match="could not be read"):
        train[0]


def _pack(tmp_path, info):
    images = build("coco_caption", info, splits=["train"])["train"]
    return pack_shards.pack_records(images.records, CAPTION_TRAIN, tmp_path / "wds", "train", samples_per_shard=2)


def test_shard_with_unreadable_image(tmp_path):
    info = write_coco(tmp_path)
    _corrupt(tmp_path)  # packed as is: the shard copies the file bytes
    pattern = _pack(tmp_path, info)
    stream = {"shards": {"train": pattern}}
    strict = build("coco_caption", {**info, **stream}, splits=["train"], data_type="webdataset")["train"]
    with pytest.raises(DataError, match=r"train-000000\.tar: sample 's000000001'.*cannot read image.*image_id=2"):
        list(strict)
    lenient = build("coco_caption", {**info, **stream}, splits=["train"], data_type="webdataset", on_bad_sample="skip")[
        "train"
    ]
    lenient.set_epoch(0)
    items = list(lenient)
    assert len(items) == 6 and lenient.num_skipped == 2
    assert sorted({it["image_id"] for it in items}) == [1, 3]


def test_shard_problems_are_found_when_building(tmp_path):
    info = write_coco(tmp_path)
    pattern = _pack(tmp_path, info)
    paths = shards.expand_pattern(pattern)
    stream = {**info, "shards": {"train": pattern}}
    os.remove(paths[-1])
    with pytest.raises(DataError, match=r"shard not found: .*train-000001\.tar"):
        build("coco_caption", stream, splits=["train"], data_type="webdataset")
    with open(paths[-1], "wb") as handle:
        handle.write(b"\0" * 100 + b"garbage")
    with pytest.raises(DataError, match=r"train-000001\.tar: (not a readable tar shard|sample)"):
        build("coco_caption", stream, splits=["train"], data_type="webdataset")
    with pytest.raises(DataError, match=r"packed as 'caption_train' samples but this split reads 'caption_eval'"):
        shards.index_shard(paths[0], CAPTION_EVAL)

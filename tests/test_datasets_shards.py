"""Webdataset shards: pack then read gives the same samples; ranks and workers get disjoint, complete parts."""

from collections import Counter

import pytest
import torch

from lavis.common.registry import registry
from lavis.datasets import pack_shards, shards, synthetic_shapes
from lavis.datasets.builders.shapes import caption_build_info, vqa_build_info
from lavis.datasets.samples import CAPTION_TRAIN, VQA

torch.set_num_threads(1)
VIS = {"train": {"name": "clip_image_eval", "image_size": 16}, "eval": {"name": "clip_image_eval", "image_size": 16}}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "shapes"
    synthetic_shapes.write_shapes(root, 13, seed=5)
    return root


def _builder(name, info, **extra):
    return registry.get("builder", name)({"build_info": info, "vis_processor": VIS, **extra})


def _key(item):
    return (
        item.get("question_id"),
        item["image_id"],
        item.get("text_input"),
        tuple(item.get("captions", ())),
        item.get("answer"),
        round(float(item["image"].sum()), 3),
    )


@pytest.mark.parametrize("name,split", [("coco_caption", "train"), ("coco_caption", "val"), ("vqav2", "train")])
def test_pack_then_read_returns_the_same_samples(shapes_root, tmp_path, name, split):
    info = caption_build_info(shapes_root) if name == "coco_caption" else vqa_build_info(shapes_root)
    images = _builder(name, info, splits=[split]).build_datasets()[split]
    records, fmt, _ = images.records, images.sample_format, None
    pattern = pack_shards.pack_records(records, fmt, tmp_path, split, samples_per_shard=3)
    if name == "coco_caption":
        info = {**info, "shards": {split: pattern}}
    else:
        info = {**info, split: {**info[split], "shards": pattern}}
    streamed = _builder(name, info, splits=[split], data_type="webdataset").build_datasets()[split]
    assert isinstance(streamed, torch.utils.data.IterableDataset)
    assert len(streamed) == len(images) and streamed.sample_ids() == images.sample_ids()
    assert streamed.annotation_file == images.annotation_file
    assert Counter(_key(it) for it in streamed) == Counter(_key(images[i]) for i in range(len(images)))


def _packed(shapes_root, tmp_path, spp=2):
    info = caption_build_info(shapes_root)
    images = _builder("coco_caption", info, splits=["train"]).build_datasets()["train"]
    pattern = pack_shards.pack_records(images.records, CAPTION_TRAIN, tmp_path, "train", samples_per_shard=spp)
    paths = shards.expand_pattern(pattern)
    return [shards.index_shard(p, CAPTION_TRAIN) for p in paths]


def _stream(index, **kw):
    ident = lambda image: torch.zeros(1)  # noqa: E731 -- the partition does not need pixels
    return shards.ShardDataset(index, CAPTION_TRAIN, ident, str, **kw)


def _ids(dataset):
    return [(it["image_id"], it["text_input"]) for it in dataset]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_complete_every_epoch(shapes_root, tmp_path, world):
    index = _packed(shapes_root, tmp_path)
    total = sum(s.num_records for s in index)
    assert total % world != 0 or world == 2  # 50 records: 3 ranks exercise the uneven case
    everything = Counter(_ids(_stream(index)))
    assert sum(everything.values()) == total and max(everything.values()) == 1
    orders = []
    for epoch in range(2):
        parts = []
        for rank in range(world):
            ds = _stream(index, rank=rank, world_size=world, uneven="exact", shuffle=True, shuffle_buffer=4, seed=1)
            ds.set_epoch(epoch)
            parts.append(_ids(ds))
            assert len(parts[-1]) == len(ds)
        merged = Counter(x for part in parts for x in part)
        assert merged == everything  # each record exactly once
        orders.append(parts[0])
    assert orders[0] != orders[1]  # the shard order changes with the epoch


def test_pad_policy_gives_equal_lengths_with_few_repeats(shapes_root, tmp_path):
    index = _packed(shapes_root, tmp_path)
    world = 3
    parts = [_ids(_stream(index, rank=r, world_size=world)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    merged = Counter(x for p in parts for x in p)
    total = sum(s.num_records for s in index)
    assert len(merged) == total and sum(merged.values()) - total <= world - 1


def test_dataloader_workers_split_a_rank_without_overlap(shapes_root, tmp_path):
    index = _packed(shapes_root, tmp_path)
    ds = _stream(index, rank=1, world_size=2, uneven="exact")
    expected = Counter(_ids(ds))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert Counter((it["image_id"], it["text_input"]) for it in loader) == expected


def test_cap_applies_to_shards(shapes_root, tmp_path):
    info = caption_build_info(shapes_root)
    images = _builder("coco_caption", info, splits=["train"]).build_datasets()["train"]
    pattern = pack_shards.pack_records(images.records, CAPTION_TRAIN, tmp_path, "train", samples_per_shard=4)
    ds = _builder(
        "coco_caption", {**info, "shards": {"train": pattern}}, splits=["train"], data_type="webdataset", max_samples=7
    ).build_datasets()["train"]
    assert ds.num_records == 7 and len(list(ds)) == 7


def test_cli_packs_a_builder_split(shapes_root, tmp_path, capsys):
    options = [f"datasets.vqav2.build_info.val.{k}={v}" for k, v in vqa_build_info(shapes_root)["val"].items() if v]
    out = tmp_path / "cli"
    assert (
        pack_shards.main(
            [
                "--builder",
                "vqav2",
                "--split",
                "val",
                "--out",
                str(out),
                "--samples-per-shard",
                "1",
                "--options",
                *options,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.strip().splitlines()
    pattern = printed[1]
    assert f"'datasets.vqav2.build_info.val.shards={pattern}'" in printed[3]
    paths = shards.expand_pattern(pattern)
    assert len(paths) == 1 and all(p.endswith(".tar") for p in paths)  # 13 images -> 1 val image
    assert sum(s.num_records for s in (shards.index_shard(p, VQA) for p in paths)) == 5
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_pack_shards_refuses_a_builder_not_read_from_shards_before_packing(tmp_path, capsys):
    from lavis.datasets import pack_shards

    out = tmp_path / "shards"
    with pytest.raises(SystemExit) as stop:
        pack_shards.run_cli(["--builder", "hateful_memes", "--split", "dev", "--out", str(out)])
    assert stop.value.code == 2
    assert "error: --builder: hateful_memes is not read from webdataset shards" in capsys.readouterr().out
    assert not out.exists()

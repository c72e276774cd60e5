"""The synthetic shapes set: deterministic, in the real formats, read by the real readers, learnable."""

import hashlib
import json
import multiprocessing
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lavis.common.errors import ConfigError
from lavis.common.registry import registry
from lavis.datasets import synthetic_shapes
from lavis.datasets.builders.shapes import caption_build_info, ensure_shapes, vqa_build_info

torch.set_num_threads(1)
VIS = {"train": {"name": "clip_image_eval", "image_size": 32}, "eval": {"name": "clip_image_eval", "image_size": 32}}


def _digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generation_is_deterministic_per_seed(tmp_path):
    a = synthetic_shapes.write_shapes(tmp_path / "a", 12, seed=3)
    synthetic_shapes.write_shapes(tmp_path / "b", 12, seed=3)
    synthetic_shapes.write_shapes(tmp_path / "c", 12, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a["split_sizes"] == {"train": 10, "val": 1, "test": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_content_of_an_id_does_not_depend_on_the_number_of_images():
    for index in range(5):
        assert synthetic_shapes.sample_scene(1, index, 64) == synthetic_shapes.sample_scene(1, index, 64)
        assert synthetic_shapes.captions(synthetic_shapes.sample_scene(1, index, 64)) == synthetic_shapes.captions(
            synthetic_shapes.sample_scene(1, index, 64)
        )
    scenes = [synthetic_shapes.sample_scene(1, i, 64) for i in range(30)]
    assert len({s["layout"] for s in scenes}) == 3 and len({x["color"] for s in scenes for x in s["shapes"]}) == 6


def test_words_come_from_the_fixed_vocabulary():
    words = set()
    for index in range(200):
        scene = synthetic_shapes.sample_scene(0, index, 64)
        for text in synthetic_shapes.captions(scene):
            words |= set(re.findall(r"[a-z0-9]+|[.,?:]", text))
        for question, answer, _, _ in synthetic_shapes.questions(scene, 0, index):
            words |= set(re.findall(r"[a-z0-9]+|[.,?:]", question))
            assert " " not in answer
            words.add(answer)
    assert words <= synthetic_shapes.VOCABULARY, words - synthetic_shapes.VOCABULARY


def test_real_readers_read_the_generated_files(tmp_path):
    root = tmp_path / "shapes"
    synthetic_shapes.write_shapes(root, 10, seed=0)
    caps = registry.get("builder", "coco_caption")(
        {"build_info": caption_build_info(root), "vis_processor": VIS}
    ).build_datasets()
    assert len(caps["train"]) == 8 * 5 and caps["val"].sample_ids() == [9] and caps["test"].sample_ids() == [10]
    gt = json.loads(Path(caps["val"].annotation_file).read_text())
    assert {a["image_id"] for a in gt["annotations"]} == {9} and len(gt["annotations"]) == 5
    vqa = registry.get("builder", "vqav2")(
        {"build_info": vqa_build_info(root), "vis_processor": VIS, "splits": ["train", "test"]}
    ).build_datasets()
    assert len(vqa["train"]) == 8 * 5 and len(vqa["test"]) == 5
    item = vqa["test"][0]
    assert item["answers"] == [item["answer"]] * 10 and item["image"].shape == (3, 32, 32)
    # the shapes builders generate into their root and read with the same readers
    section = {"shapes": {"root": str(root), "num_images": 10, "seed": 0}, "vis_processor": VIS, "splits": ["val"]}
    own = registry.get("builder", "shapes_caption")(section).build_datasets()
    assert own["val"].sample_ids() == [9]


def test_oracle_captions_score_high_cider_and_wrong_colours_do_not():
    from pycocoevalcap.cider.cider import Cider

    def tokens(text):
        return " ".join(re.findall(r"[a-z0-9]+", text))

    scenes = [synthetic_shapes.sample_scene(0, i, 64) for i in range(60)]
    refs = {i: [tokens(c) for c in synthetic_shapes.captions(s)] for i, s in enumerate(scenes)}
    oracle = {i: [refs[i][3]] for i in refs}
    swapped = {i: [refs[(i + 1) % len(refs)][3]] for i in refs}  # another image's content
    good, _ = Cider().compute_score(refs, oracle)
    bad, _ = Cider().compute_score(refs, swapped)
    assert good >= 1.0  # CIDEr 100 on the usual x100 scale is reachable by getting the content right
    assert bad < good / 2


def _ensure(args):
    root, n = args
    torch.set_num_threads(1)
    return str(
        ensure_shapes(
            OmegaConf.create({"root": root, "num_images": n, "seed": 0, "image_size": 32, "fractions": [0.8, 0.1, 0.1]})
        )
    )


def test_two_ranks_generate_once_without_racing(tmp_path):
    root = str(tmp_path / "shared")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_ensure, [(root, 8), (root, 8)])
    assert results == [root, root]
    assert json.loads((Path(root) / "shapes.json").read_text())["num_images"] == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []


def test_existing_root_with_other_settings_is_not_overwritten(tmp_path):
    _ensure((str(tmp_path / "s"), 5))
    with pytest.raises(ConfigError, match="num_images"):
        _ensure((str(tmp_path / "s"), 6))


def test_cli(tmp_path, capsys):
    assert synthetic_shapes.main(["--out", str(tmp_path / "cli"), "--num-images", "4", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 2
    assert (tmp_path / "cli" / "annotations" / "dataset_coco.json").is_file()
    with pytest.raises(SystemExit):
        synthetic_shapes.main(["--out", str(tmp_path / "cli"), "--num-images", "4"])

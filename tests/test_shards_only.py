"""Training from webdataset shards on a node that holds only the shards (no image, Karpathy or annotation file).

The packer (``python -m lavis.datasets.pack_shards``, no RuntimeWarning) prints the exact ``--options``;
train.py with exactly those options trains, for ``coco_caption`` (the README's recipe, with the data
root pointing at an empty folder) and for ``shapes_caption`` (whose set is not generated then).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHAPES_IMAGES, check_ok, run_entry, subprocess_env, write_config

from lavis.datasets.builders.shapes import caption_build_info

pytestmark = pytest.mark.slow


def pack(builder: str, out: Path, options: list[str]) -> list[str]:
    """Run the packer; the --options it prints, as train.py arguments."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lavis.datasets.pack_shards",
            "--builder",
            builder,
            "--split",
            "train",
            "--out",
            str(out),
            "--samples-per-shard",
            "16",
            "--options",
            *options,
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_ok(proc)
    assert "Warning" not in proc.stderr, proc.stderr
    (line,) = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("--options ")]
    return shlex.split(line)[1:]


def train_from_shards(tmp_path: Path, datasets: dict, printed: list[str], env: dict):
    cfg = write_config(
        tmp_path / "train.yaml",
        datasets=datasets,
        run={
            "task": "captioning",
            "device": "cpu",
            "batch_size_train": 8,
            "max_steps": 3,
            "valid_splits": [],
            "metrics": ["CIDEr"],
            "progress_bar": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
        },
    )
    proc = run_entry("train.py", cfg, options=[*printed, "run.log_freq=1"], env=env)
    check_ok(proc)
    assert "step 3: loss" in (tmp_path / "out" / "run" / "log.txt").read_text()


def test_coco_caption_from_shards_needs_no_raw_file(tmp_path, shapes_root):
    info = caption_build_info(shapes_root)
    printed = pack(
        "coco_caption",
        tmp_path / "wds",
        [
            f"datasets.coco_caption.build_info.images={info['images']}",
            f"datasets.coco_caption.build_info.karpathy_file={info['karpathy_file']}",
        ],
    )
    assert printed[:2] == ["datasets.coco_caption.data_type=webdataset", "datasets.coco_caption.splits=[train]"]
    empty = tmp_path / "empty_data_root"  # the defaults' Karpathy file, images and annotations are not there
    empty.mkdir()
    size = {
        "train": {"name": "clip_image_train", "image_size": 64},
        "eval": {"name": "clip_image_eval", "image_size": 64},
    }
    train_from_shards(
        tmp_path, {"coco_caption": {"vis_processor": size}}, printed, subprocess_env(PETVLM_DATA=str(empty))
    )
    assert not any(empty.iterdir())


def test_shapes_caption_from_shards_generates_nothing(tmp_path, shapes_root):
    printed = pack(
        "shapes_caption",
        tmp_path / "wds",
        [
            f"datasets.shapes_caption.shapes.root={shapes_root}",
            f"datasets.shapes_caption.shapes.num_images={SHAPES_IMAGES}",
        ],
    )
    absent = tmp_path / "no_shapes_here"
    train_from_shards(tmp_path, {"shapes_caption": {"shapes": {"root": str(absent)}}}, printed, subprocess_env())
    assert not absent.exists()

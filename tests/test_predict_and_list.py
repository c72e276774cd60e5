"""``python -m lavis.predict`` on a folder of images, ``python -m lavis list`` and ``train.py --print-config``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml
from conftest import REPO, check_ok, subprocess_env

from lavis.__main__ import listing
from lavis.models import load_model_and_preprocess


def run_module(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def test_predict_a_folder_of_images_matches_the_python_api(tmp_path, shapes_root, trained_checkpoint):
    folder = tmp_path / "mine"
    folder.mkdir()
    sources = sorted((shapes_root / "images").rglob("*.png"))[:5]
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"image": str(sources[-1]), "question": "What colour is it?", "answer": "red"}) + "\n")

    proc = run_module(
        "-m",
        "lavis.predict",
        "--checkpoint",
        str(trained_checkpoint),
        "--image",
        str(folder),
        "--json",
        "--batch-size",
        "2",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "6",
    )
    check_ok(proc)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(folder / f"img{i}.png") for i in range(5)]
    model, _, _ = load_model_and_preprocess(checkpoint=trained_checkpoint)
    expected = model.caption(sorted(folder.glob("*.png")), num_beams=1, max_new_tokens=6)
    assert [r["caption"] for r in records] == expected and all(expected)

    proc = run_module(
        "-m",
        "lavis.predict",
        "--checkpoint",
        str(trained_checkpoint),
        "--image",
        str(folder / "img*.png"),
        "--question",
        "What colour is it?",
        "--demos",
        str(demos),
        "--num-beams",
        "1",
    )
    check_ok(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all("\t" in line for line in lines)
    images = sorted(folder.glob("img*.png"))
    answers = model.answer(
        images, ["What colour is it?"] * 5, demos=[(sources[-1], "What colour is it?", "red")], num_beams=1
    )
    assert lines == [f"{p}\t{a}" for p, a in zip(images, answers)]


def test_predict_names_a_path_with_no_image(tmp_path):
    proc = run_module("-m", "lavis.predict", "--model-type", "tiny", "--image", str(tmp_path / "nothing*.jpg"))
    assert proc.returncode == 2 and "no image file there" in proc.stderr and "Traceback" not in proc.stderr


def test_lavis_list_shows_each_registry_with_model_types():
    text = listing(["models", "datasets", "tasks", "processors", "lr_schedulers", "runners"])
    for name in (
        "openflamingo",
        "model_type tiny",
        "model_type llama7b_vitl14",
        "coco_caption",
        "shapes_vqa",
        "captioning",
        "vqa",
        "clip_image_eval",
        "linear_warmup_cosine_lr",
        "runner_iter",
    ):
        assert name in text
    proc = run_module("-m", "lavis", "list", "tasks", timeout=120)
    check_ok(proc)
    assert proc.stdout.startswith("tasks:") and "captioning" in proc.stdout and "openflamingo" not in proc.stdout


def test_print_config_prints_the_merged_validated_config_and_exits():
    proc = run_module(
        "train.py",
        "--cfg-path",
        "configs/projects/examples/my_first_project.yaml",
        "--print-config",
        "--options",
        "run.init_lr=5e-4",
        timeout=120,
    )
    check_ok(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["run"]["init_lr"] == 5e-4 and cfg["model"]["tiny"]["lm_layers"] == 2  # defaults filled in
    assert cfg["run"]["runner"] == "runner_base"

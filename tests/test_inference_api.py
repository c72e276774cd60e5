"""The Python API (lavis/models/inference.py): load_model_and_preprocess, caption, answer, generate_interleaved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lavis.common.errors import CheckpointError, DataError
from lavis.models import load_model_and_preprocess

FAST = {"num_beams": 1, "max_new_tokens": 6}


def shapes_images(root: Path, split: str = "val", n: int = 3) -> list[Path]:
    return sorted((root / "images").rglob(f"*{split}*.png"))[:n] or sorted((root / "images").rglob("*.png"))[:n]


def test_the_tiny_model_and_its_processors(shapes_root):
    model, vis, txt = load_model_and_preprocess("openflamingo", model_type="tiny")
    assert not model.training and {"train", "eval"} <= set(vis)
    image = Image.open(shapes_images(shapes_root)[0])
    pixels = vis["eval"](image)
    assert pixels.shape == (3, model.image_size, model.image_size)
    assert txt["eval"]("A red  circle.") == "A red circle."  # whitespace collapsed, as the datasets do
    (caption,) = model.caption([image], **FAST)
    assert isinstance(caption, str)


def test_caption_and_answer_with_a_trained_checkpoint_match_the_evaluation_pipeline(shapes_root, trained_checkpoint):
    """The API gives the text the evaluation's collator + task would give for the same image."""
    from omegaconf import OmegaConf

    from lavis.datasets.collators import CaptionCollator, VQACollator
    from lavis.tasks.captioning import CaptioningTask
    from lavis.tasks.vqa import VQATask

    model, vis, _ = load_model_and_preprocess(checkpoint=trained_checkpoint)
    images = shapes_images(shapes_root)
    captions = model.caption(images, **FAST)
    answers = model.answer(images, ["What shape is in the image?"] * len(images), **FAST)
    assert len(captions) == len(answers) == len(images)
    assert all(captions) and all(answers), (captions, answers)  # a trained model says something

    run = {
        "num_beams": 1,
        "max_new_tokens": 6,
        "min_new_tokens": 0,
        "length_penalty": -2.0,
    }
    items = [
        {
            "image": vis["eval"](Image.open(p).convert("RGB")),
            "image_id": i,
            "question_id": i,
            "text_input": "What shape is in the image?",
        }
        for i, p in enumerate(images)
    ]
    # Each task's run section holds its own keys (validated): captioning's metrics, VQA's always_normalize.
    task = CaptioningTask(OmegaConf.create({"run": {**run, "metrics": ["CIDEr"], "agg_metric": "CIDEr"}}))
    expected = [r["caption"] for r in task.valid_step(model, CaptionCollator(model.tokenizer, "eval")(items))]
    assert captions == expected
    task = VQATask(OmegaConf.create({"run": {**run, "always_normalize": False}}))
    expected = [r["answer"] for r in task.valid_step(model, VQACollator(model.tokenizer, "eval")(items))]
    assert answers == expected
    # Demonstrations change the prompt (and so, for this trained model, may change the text), never crash.
    demo = (images[-1], "a shape")
    assert len(model.caption(images[:2], demos=[demo, demo], **FAST)) == 2
    # generate_interleaved with the caption prompt is the caption before the clean-up.
    raw = model.generate_interleaved("<image>Output:", [images[0]], **FAST)
    assert raw.split("Output", 1)[0].replace('"', "").strip() == captions[0]


def test_the_run_directory_loads_like_its_checkpoint(trained_checkpoint, shapes_root):
    by_file, _, _ = load_model_and_preprocess(checkpoint=trained_checkpoint)
    by_dir, _, _ = load_model_and_preprocess(checkpoint=trained_checkpoint.parent.parent)
    a, b = by_file.trainable_state_dict(), by_dir.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mistakes_are_user_errors(tmp_path, shapes_root):
    model, _, _ = load_model_and_preprocess("openflamingo", "tiny")
    image = shapes_images(shapes_root)[0]
    with pytest.raises(DataError, match="2 <image> tag"):
        model.generate_interleaved("<image><image>Output:", [image])
    with pytest.raises(DataError, match="2 image"):
        model.answer([image, image], ["one question"])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model_and_preprocess(checkpoint=tmp_path / "missing.pt")

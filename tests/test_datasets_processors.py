"""Image and text processors: the eval image processor is exactly open_clip's transform."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lavis.common.errors import ConfigError
from lavis.datasets.processors import build_processor

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures" / "openclip_preprocess"


def _noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,wh", [(32, (70, 52)), (48, (36, 60)), (24, (24, 24)), (40, (97, 33))])
def test_eval_processor_equals_open_clip_transform(size, wh):
    import open_clip

    ours = build_processor({"name": "clip_image_eval", "image_size": size}, "vis.eval")
    theirs = open_clip.image_transform(size, is_train=False)
    for image in (_noise_image(*wh), _noise_image(*wh).convert("L"), _noise_image(*wh).convert("RGBA")):
        assert torch.equal(ours(image), theirs(image))


def test_eval_processor_matches_reference_fixture():
    settings = json.loads((FIXTURES / "preprocess.json").read_text())
    ours = build_processor({"name": "clip_image_eval", "image_size": 48}, "vis.eval")
    for entry in settings["images"]:
        image = Image.open(FIXTURES / Path(entry["png"]).name)
        expected = np.load(FIXTURES / Path(entry["expected"]).name)
        got = ours(image).numpy()
        assert list(got.shape) == entry["expected_shape"]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_train_processor_shape_and_no_flip_by_default():
    # red on the left half, blue on the right half: left/right must survive augmentation
    array = np.zeros((40, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    image = Image.fromarray(array)
    proc = build_processor({"name": "clip_image_train", "image_size": 32}, "vis.train")
    for seed in range(20):
        torch.manual_seed(seed)
        out = proc(image)
        assert out.shape == (3, 32, 32)
        assert out[0, :, :8].mean() > out[2, :, :8].mean()  # left stays red
        assert out[2, :, -8:].mean() > out[0, :, -8:].mean()  # right stays blue
    torch.manual_seed(3)
    a = proc(image)
    torch.manual_seed(3)
    assert torch.equal(a, proc(image))


def test_train_processor_rejects_bad_scale():
    with pytest.raises(ConfigError, match="min_scale"):
        build_processor({"name": "clip_image_train", "min_scale": 0.0}, "vis.train")


@pytest.mark.parametrize("name", ["clip_image_eval", "clip_image_train"])
@pytest.mark.parametrize(("options", "key"), [({"std": [0.3, 0.0, 0.3]}, "std"), ({"mean": [0.5, 0.5]}, "mean/std")])
def test_image_processors_reject_bad_normalisation(name, options, key):
    with pytest.raises(ConfigError, match=rf"vis\.{key}"):
        build_processor({"name": name, **options}, "vis")


def test_text_processors():
    caption = build_processor({"name": "caption_text", "lowercase": True, "max_words": 4}, "text.train")
    assert caption("  A  Red\tCircle on\nthe left ") == "a red circle on"
    assert build_processor({"name": "caption_text"}, "t")(" A  b. ") == "A b."
    question = build_processor({"name": "question_text"}, "text.eval")
    assert question(" what  color is it ") == "what color is it?"
    assert question("how many?? ") == "how many?"


def test_processor_spec_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"datasets\.x\.vis_processor\.eval: a processor needs a 'name'"):
        build_processor({"image_size": 3}, "datasets.x.vis_processor.eval")
    with pytest.raises(ConfigError, match=r"vis\.eval\.image_sise.*image_size"):
        build_processor({"name": "clip_image_eval", "image_sise": 3}, "vis.eval")
    with pytest.raises(ConfigError, match="Did you mean 'caption_text'"):
        build_processor({"name": "caption_txt"}, "text.eval")

"""Few-shot demonstration selection: random draws and RICES, on tiny generated datasets."""

import math
import os

import pytest
import torch
from conftest import shapes_section
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis.common.config import read_yaml
from lavis.common.errors import ConfigError, DataError
from lavis.common.registry import registry
from lavis.datasets import samples
from lavis.datasets.fewshot import RICES, FewShotDataset, rices_demo_indices
from lavis.datasets.samples import SplitDataset
from lavis.models import build_model
from lavis.tasks.captioning import CaptioningTask

torch.set_num_threads(1)


class ListDataset(SplitDataset):
    """A map-style dataset over ready-made items, with the contract's ``sample_id_key``/``sample_ids``."""

    def __init__(self, items, sample_id_key):
        self.items, self.sample_id_key = items, sample_id_key
        self.loads = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.loads += 1
        return dict(self.items[index])

    def sample_ids(self):
        return list(dict.fromkeys(item[self.sample_id_key] for item in self.items))


def vqa_dataset(num_images=12, questions_per_image=3):
    """Questions about shared images: question_id 100*img + q, image_id img."""
    items = []
    for img in range(num_images):
        for q in range(questions_per_image):
            items.append(
                {
                    "image": torch.full((3, 2, 2), float(img)),
                    "text_input": f"q{q}?",
                    "answer": "yes",
                    "answers": ["yes"] * 10,
                    "question_id": 100 * img + q,
                    "image_id": img,
                }
            )
    return ListDataset(items, "question_id")


def caption_dataset(num_images=10, captions_per_image=2):
    items = [
        {"image": torch.full((3, 2, 2), float(img)), "text_input": f"c{img}.{c}", "image_id": img}
        for img in range(num_images)
        for c in range(captions_per_image)
    ]
    return ListDataset(items, "image_id")


def demo_indices_of(items):
    return [item["demo_indices"] for item in items]


def all_demos(data):
    return [data.demo_indices(i) for i in range(len(data))]


def test_random_demos_are_reproducible_and_differ_across_trials_and_seeds():
    pool, queries = caption_dataset(), caption_dataset(num_images=4, captions_per_image=1)
    base = all_demos(FewShotDataset(queries, pool, num_shots=4, seed=42, trial=0))
    assert base == all_demos(FewShotDataset(queries, pool, num_shots=4, seed=42, trial=0))
    assert all(len(row) == 4 == len(set(row)) for row in base)
    other_trial = all_demos(FewShotDataset(queries, pool, num_shots=4, seed=42, trial=1))
    other_seed = all_demos(FewShotDataset(queries, pool, num_shots=4, seed=7, trial=0))
    assert other_trial != base and other_seed != base
    # Different queries of one trial get different draws too.
    assert len({tuple(row) for row in base}) == len(base)


def test_random_demos_do_not_depend_on_access_order_or_workers():
    pool, queries = vqa_dataset(), vqa_dataset(num_images=3, questions_per_image=2)
    data = FewShotDataset(queries, pool, num_shots=3, seed=0)
    forward = [data[i]["demo_indices"] for i in range(len(data))]
    backward = [data[i]["demo_indices"] for i in reversed(range(len(data)))][::-1]
    assert forward == backward
    loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=demo_indices_of)
    assert [row for batch in loader for row in batch] == forward


def test_demos_never_show_the_query_sample_or_its_image():
    data = vqa_dataset(num_images=6, questions_per_image=4)
    # Pool == queries: the query itself and its image's other questions are always admissible
    # candidates; a 20-shot draw over 24 items must skip them all.
    fewshot = FewShotDataset(data, data, num_shots=20, seed=3)
    for i in range(len(data)):
        item = fewshot[i]
        assert len(item["demos"]) == 20
        assert all(d["image_id"] != item["image_id"] for d in item["demos"])
        assert all(d["question_id"] != item["question_id"] for d in item["demos"])
        assert [d["question_id"] for d in item["demos"]] == [data.items[j]["question_id"] for j in item["demo_indices"]]
    with pytest.raises(DataError, match="only 20 admissible items, 21 demos"):
        FewShotDataset(data, data, num_shots=21, seed=3)[0]


def test_caption_demos_exclude_the_query_image():
    data = caption_dataset(num_images=5, captions_per_image=2)
    fewshot = FewShotDataset(data, data, num_shots=8, seed=1)
    for i in range(len(data)):
        item = fewshot[i]
        assert all(d["image_id"] != item["image_id"] for d in item["demos"])


def test_zero_shot_text_demo_option():
    pool, queries = caption_dataset(), caption_dataset(num_images=3, captions_per_image=1)
    text = FewShotDataset(queries, pool, num_shots=0, seed=5, zero_shot_text_demos=True)
    item = text[1]
    assert len(item["demos"]) == 2 and item["demos_text_only"] is True
    assert item["demo_indices"] == text.demo_indices(1)
    plain = FewShotDataset(queries, pool, num_shots=0, seed=5)
    assert plain[1]["demos"] == [] and "demos_text_only" not in plain[1]
    # The option only concerns 0-shot: with shots, demos carry their images.
    assert "demos_text_only" not in FewShotDataset(queries, pool, num_shots=2, seed=5, zero_shot_text_demos=True)[0]


def test_wrapper_exposes_the_query_dataset_and_validates_arguments():
    pool, queries = caption_dataset(), caption_dataset(num_images=3, captions_per_image=1)
    data = FewShotDataset(queries, pool, num_shots=1, seed=0)
    assert len(data) == 3 and data.sample_id_key == "image_id" and data.sample_ids() == [0, 1, 2]
    with pytest.raises(ConfigError, match="num_shots"):
        FewShotDataset(queries, pool, num_shots=-1, seed=0)
    with pytest.raises(ConfigError, match="'random' or 'rices'"):
        FewShotDataset(queries, pool, num_shots=1, seed=0, method="nearest")
    with pytest.raises(ConfigError, match="needs a RICES index"):
        FewShotDataset(queries, pool, num_shots=1, seed=0, method="rices")


# --- RICES ---------------------------------------------------------------------------------

ANGLES = [0.0, 10.0, 30.0, 80.0, 170.0, -45.0]
NORMS = [1.0, 0.5, 100.0, 3.0, 1.0, 2.0]  # a large norm must not win: similarity is cosine


def vector_image(angle_deg, norm=1.0):
    """A (2, 1, 1) "image" whose flattened pixels are a 2-D vector at ``angle_deg``."""
    a = math.radians(angle_deg)
    return torch.tensor([math.cos(a), math.sin(a)]).mul(norm).view(2, 1, 1)


class CountingFeatures:
    """feature_fn: flattens the image; counts the images it saw."""

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += images.shape[0]
        return images.flatten(1)


def angle_pool(angles=ANGLES, norms=NORMS):
    items = [
        {"image": vector_image(a, n), "image_id": i, "text_input": f"c{i}"}
        for i, (a, n) in enumerate(zip(angles, norms))
    ]
    return ListDataset(items, "image_id")


def test_rices_finds_true_nearest_neighbours_most_similar_last():
    rices = RICES(angle_pool(), CountingFeatures(), cache_path=None, batch_size=4)
    queries = torch.stack([vector_image(12.0, 7.0), vector_image(-40.0), vector_image(175.0)])
    query_ids = [(100 + i, None) for i in range(len(queries))]  # images the pool does not hold
    found = rices_demo_indices(rices.similarities(rices.encode(queries)), 3, query_ids, rices.pool_ids)
    # 12 deg: 10 (2 away), 0 (12), 30 (18; norm 100) -> most similar last. -40: -45, 0, 10. 175: 170, 80, -45.
    assert found == [[2, 0, 1], [1, 0, 5], [5, 3, 4]]
    assert torch.allclose(rices.features.norm(dim=1), torch.ones(len(ANGLES)))


def test_rices_caches_features_and_recomputes_a_stale_cache(tmp_path):
    path = tmp_path / "rices" / "pool.pt"
    fn = CountingFeatures()
    first = RICES(angle_pool(), fn, cache_path=path, batch_size=4, feature_name="clip-a")
    assert first.computed and fn.images == len(ANGLES) and path.is_file()
    assert not [p for p in os.listdir(path.parent) if p != "pool.pt"]  # no temporary file left behind
    second = RICES(angle_pool(), fn, cache_path=path, batch_size=4, feature_name="clip-a")
    assert not second.computed and fn.images == len(ANGLES)  # read back, the encoder did not run
    assert torch.equal(second.features, first.features) and second.pool_ids == first.pool_ids
    # Another encoder name, or another pool, makes the cache stale.
    assert RICES(angle_pool(), fn, cache_path=path, batch_size=4, feature_name="clip-b").computed
    smaller = angle_pool(ANGLES[:4], NORMS[:4])
    assert len(RICES(smaller, fn, cache_path=path, batch_size=4, feature_name="clip-b")) == 4
    assert RICES(smaller, fn, cache_path=path, batch_size=4, feature_name="clip-b").computed is False


def test_rices_refuses_a_file_that_is_not_its_cache(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(DataError, match="notes.pt: not a RICES feature cache"):
        RICES(angle_pool(), CountingFeatures(), cache_path=path, feature_name="x")


def test_rices_demos_are_nearest_admissible_neighbours():
    # Two questions per image; images at distinct angles.
    angles = [0.0, 5.0, 20.0, 60.0, 100.0, 150.0]
    items = [
        {
            "image": vector_image(a),
            "text_input": "q?",
            "answer": "a",
            "answers": ["a"],
            "question_id": 10 * i + q,
            "image_id": i,
        }
        for i, a in enumerate(angles)
        for q in range(2)
    ]
    data = ListDataset(items, "question_id")
    rices = RICES(data, CountingFeatures(), batch_size=5)
    fewshot = FewShotDataset(data, data, num_shots=3, seed=0, method="rices", rices=rices)
    item = fewshot[0]  # image 0 at 0 deg: its own two questions are excluded; then both of 5 deg, one of 20
    assert [d["image_id"] for d in item["demos"]] == [2, 1, 1]
    item = fewshot[9]  # image 4 at 100 deg: both questions of 60 (40 away), one of 150 (50 away)
    assert [d["image_id"] for d in item["demos"]] == [5, 3, 3]
    assert all(len(fewshot[i]["demos"]) == 3 for i in range(len(fewshot)))
    # The ranking is a pure function of the features: another seed gives the same demos, and the
    # query features are not recomputed for the same query dataset.
    seen = rices.feature_fn.images
    again = FewShotDataset(data, data, num_shots=3, seed=9, method="rices", rices=rices)
    assert all_demos(again) == all_demos(fewshot) and rices.feature_fn.images == seen


def test_rices_exclusion_falls_back_to_a_full_ranking():
    # Candidate margin exceeded: the 40 nearest rows all belong to the query's image.
    sims = torch.cat([torch.full((1, 40), 0.9), torch.tensor([[0.1, 0.5, 0.3]])], dim=1)
    pool_ids = [(7, None)] * 40 + [(1, None), (2, None), (3, None)]
    assert rices_demo_indices(sims, 2, [(7, None)], pool_ids) == [[42, 41]]


def test_rices_features_feed_a_half_precision_tower_its_dtype_and_return_float32():
    from pathlib import Path

    from lavis.common.config import read_yaml
    from lavis.models import build_model
    from lavis.runners.fewshot_eval import rices_features

    tiny_yaml = Path(__file__).resolve().parents[1] / "lavis/configs/models/openflamingo/tiny.yaml"
    cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(read_yaml(tiny_yaml).model).items()}
    model = build_model({**cfg, "frozen_dtype": "bfloat16"}).eval()
    assert next(model.vision_encoder.parameters()).dtype == torch.bfloat16
    images = torch.randn(3, 3, model.image_size, model.image_size)  # what the eval image processor yields
    features = rices_features(model, images, "cpu")
    assert features.dtype == torch.float32 and features.shape[0] == 3 and torch.isfinite(features).all()
    # The same embedding as the tower computes on the bf16-rounded batch.
    with torch.no_grad():
        expected = model.vision_encoder(images.to(torch.bfloat16)).float()
    assert torch.equal(features, expected)
    # It is usable as RICES' feature function, end to end.
    pool = caption_dataset(num_images=4, captions_per_image=1)
    for item in pool.items:
        item["image"] = torch.randn(3, model.image_size, model.image_size)
    rices = RICES(pool, lambda batch: rices_features(model, batch, "cpu"), batch_size=2)
    assert len(rices) == 4


def test_demo_pool_size_restricts_random_demos_to_a_seeded_subset_per_trial():
    queries, pool = caption_dataset(num_images=4), caption_dataset(num_images=40)
    chosen = {}
    for trial in (0, 1):
        fewshot = FewShotDataset(queries, pool, num_shots=3, seed=7, trial=trial, pool_size=8)
        subset = fewshot.pool_subset
        assert len(subset) == len(set(subset)) == 8
        again = FewShotDataset(queries, pool, num_shots=3, seed=7, trial=trial, pool_size=8)
        assert again.pool_subset == subset  # depends on (seed, trial) only
        for i in range(len(queries)):
            demos = fewshot.demo_indices(i)
            assert len(demos) == 3 and set(demos) <= set(subset)
            # the query's own image is still never shown
            assert all(pool.items[j]["image_id"] != queries.items[i]["image_id"] for j in demos)
        chosen[trial] = subset
    assert chosen[0] != chosen[1]
    whole = FewShotDataset(queries, pool, num_shots=3, seed=7, pool_size=len(pool) + 5)
    assert whole.pool_subset is None  # a size beyond the pool keeps every item


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_demo_pool_size_is_a_config_error(size):
    with pytest.raises(ConfigError, match="demo pool size"):
        FewShotDataset(caption_dataset(), caption_dataset(), num_shots=1, seed=0, pool_size=size)


@pytest.mark.parametrize("builder", ["shapes_caption", "shapes_vqa"])
def test_text_only_demos_read_no_image_and_give_the_same_prompts(shapes_root, monkeypatch, builder):
    splits = registry.get("builder", builder)(shapes_section(shapes_root)).build_datasets()
    decoded = []
    decode = samples.decode_image
    monkeypatch.setattr(samples, "decode_image", lambda source, where: decoded.append(source) or decode(source, where))

    def items(keep_images):
        data = FewShotDataset(
            splits["val"],
            splits["train"],
            0,
            seed=3,
            zero_shot_text_demos=True,
            text_demos_keep_images=keep_images,
        )
        decoded.clear()
        out = [data[i] for i in range(4)]
        return out, len(decoded)

    lean, lean_reads = items(False)
    full, full_reads = items(True)
    assert lean_reads == 4 and full_reads == 4 * 3  # the queries' images only vs queries' and 2 demos' each
    for a, b in zip(lean, full):
        assert [d["image"] for d in a["demos"]] == [None, None]
        assert [{**d, "image": None} for d in b["demos"]] == a["demos"]
    if builder == "shapes_caption":
        model = build_model(read_yaml("lavis/configs/models/openflamingo/tiny.yaml").model)
        collate = CaptioningTask(OmegaConf.create({"run": {}})).collator(model, "eval")
        x, y = collate(lean), collate(full)
        for key in ("lang_x", "attention_mask", "vision_x"):
            assert torch.equal(x[key], y[key]), key

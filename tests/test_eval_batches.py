"""The prediction pass: bucketed vs unbucketed and cached vs uncached give identical results files.

Real tiny OpenFlamingo (gates opened, so the images steer the output), shapes captions and VQA,
4-shot random demonstrations and 0-shot, beam search as the evaluation runs it.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from lavis.common.errors import DataError
from lavis.datasets.builders.shapes import ShapesCaptionBuilder, ShapesVQABuilder
from lavis.datasets.collators import prompt_length
from lavis.datasets.fewshot import FewShotDataset
from lavis.metrics.caption import write_caption_results
from lavis.models import build_model
from lavis.models.flamingo.media_cache import MediaCache, media_cache_enabled
from lavis.runners import eval_batches
from lavis.runners.eval_batches import eval_batches as batches_of
from lavis.runners.eval_batches import predict_records, shared_media_cache
from lavis.runners.precision import resolve_precision
from lavis.tasks.captioning import CaptioningTask
from lavis.tasks.vqa import VQATask
from tests.test_flamingo_network import open_gates, tiny_cfg

torch.set_num_threads(1)
DECODING = {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 0, "length_penalty": -2.0}
RUN = {**DECODING, "metrics": ["CIDEr"], "agg_metric": "CIDEr"}  # captioning's keys; VQA's section: DECODING
PROCESSORS = {
    "train": {"name": "clip_image_eval", "image_size": 64},
    "eval": {"name": "clip_image_eval", "image_size": 64},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    model = build_model(tiny_cfg()).eval()
    open_gates(model, 1.5)
    data = {}
    for name, builder in (("caption", ShapesCaptionBuilder), ("vqa", ShapesVQABuilder)):
        splits = builder(
            {"shapes": {"root": str(root), "num_images": 60}, "train_splits": [], "vis_processor": PROCESSORS}
        ).build_datasets()
        data[name] = splits
    return model, data


def run(model, task, dataset, bucket, cache, batch_size=4):
    return predict_records(
        task,
        model,
        dataset,
        torch.device("cpu"),
        resolve_precision("fp32", torch.device("cpu")),
        batch_size,
        dataset.sample_id_key,
        bucket=bucket,
        cache=cache,
    )


@pytest.mark.parametrize("kind,shots", [("caption", 4), ("caption", 0), ("vqa", 4)])
def test_bucketed_and_cached_passes_give_identical_results_files(setup, tmp_path, monkeypatch, kind, shots):
    model, data = setup
    if kind == "caption":
        task = CaptioningTask(OmegaConf.create({"run": RUN}))
    else:
        task = VQATask(OmegaConf.create({"run": DECODING}))
    fewshot = FewShotDataset(data[kind]["val"], data[kind]["train"], num_shots=shots, seed=1)
    monkeypatch.setattr(eval_batches, "BUCKET_WINDOW", 4)
    encoded = []
    hook = model.perceiver.register_forward_hook(lambda m, a, out: encoded.append(out.shape[0] * out.shape[1]))
    files = {}
    for bucket, cache in [(False, False), (True, False), (False, True), (True, True)]:
        shared_media_cache(model).clear()
        encoded.clear()
        records = run(model, task, fewshot, bucket, cache)
        files[bucket, cache] = tmp_path / f"{bucket}_{cache}.json"
        write_caption_results(records, files[bucket, cache]) if kind == "caption" else files[bucket, cache].write_text(
            json.dumps(records)
        )
        images = sum(encoded)
        if cache:  # each distinct image once: fewer encodings than images shown (demos repeat)
            assert images < len(fewshot) * (shots + 1) if shots else images == len(fewshot)
        else:
            assert images == len(fewshot) * (shots + 1)
    hook.remove()
    texts = {key: path.read_bytes() for key, path in files.items()}
    assert len(set(texts.values())) == 1, texts
    # The check means something: the images steer the generated tokens, and bucketing regrouped the rows.
    batch = task.collator(model, "eval")([fewshot[i] for i in range(4)])
    args = (batch["lang_x"], batch["attention_mask"])
    kwargs = {"num_beams": 3, "max_new_tokens": 8}
    assert not torch.equal(
        model.generate(batch["vision_x"], *args, **kwargs),
        model.generate(torch.zeros_like(batch["vision_x"]), *args, **kwargs),
    )
    rows = [r for r, _ in batches_of(fewshot, task.collator(model, "eval"), 4, 0, 1)]
    assert sorted(i for r in rows for i in r) == list(range(len(fewshot)))
    if shots:
        assert rows != [list(range(i, min(i + 4, len(fewshot)))) for i in range(0, len(fewshot), 4)]


def test_bucketed_rows_are_sorted_by_prompt_length_within_a_window(setup, monkeypatch):
    model, data = setup
    task = CaptioningTask(OmegaConf.create({"run": RUN}))
    fewshot = FewShotDataset(data["caption"]["val"], data["caption"]["train"], num_shots=4, seed=1)
    monkeypatch.setattr(eval_batches, "BUCKET_WINDOW", 100)
    pads = {True: 0, False: 0}
    for bucket in (True, False):
        for _, batch in batches_of(fewshot, task.collator(model, "eval"), 4, 0, 1, bucket=bucket):
            pads[bucket] += int((batch["attention_mask"] == 0).sum())
    assert pads[True] < pads[False]


def test_ddp_shards_cover_the_split_exactly_once(setup):
    model, data = setup
    task = CaptioningTask(OmegaConf.create({"run": RUN}))
    dataset = data["caption"]["val"]
    ids = []
    for rank in range(2):
        for _, batch in batches_of(dataset, task.collator(model, "eval"), 4, rank, 2):
            ids += batch["image_id"]
    assert sorted(set(ids)) == sorted(dataset.sample_ids())
    assert len(ids) == len(dataset) + len(dataset) % 2  # the DistributedSampler's padding, as before


def test_media_cache_is_bounded_and_rebinds_on_new_weights(setup):
    model, data = setup
    vision_x = torch.randn(3, 2, 1, 3, 64, 64)
    per_image = 16 * 64 * 4  # tiny: 16 latents x width 64, float32
    cache = MediaCache(max_bytes=4 * per_image)
    with torch.no_grad(), media_cache_enabled(model, cache):
        cached = model.encode_vision(vision_x)
        assert cache.misses == 6 and len(cache) == 4 and cache.nbytes == 4 * per_image  # LRU kept the last 4
        again = model.encode_vision(vision_x[1:])  # rows 1-2: the 4 images still held
        assert cache.hits == 4
    with torch.no_grad():
        torch.testing.assert_close(cached, model.encode_vision(vision_x), atol=0, rtol=0)
        torch.testing.assert_close(again, cached[1:], atol=0, rtol=0)
        model.perceiver.norm.bias.add_(1.0)
        with media_cache_enabled(model, cache):
            assert len(cache) == 0  # other weights: nothing stale is served
        model.perceiver.norm.bias.sub_(1.0)
    with pytest.raises(ValueError):
        MediaCache(max_bytes=0)


@pytest.mark.parametrize("shots, max_length", [(0, None), (4, None), (4, 40)])
def test_prompt_lengths_are_those_of_collating_each_item_alone(setup, shots, max_length):
    """Bucketing sorts by the collator's prompt_lengths (tokenisation only): the lengths of one-item batches,
    also when the oldest demonstrations are dropped to fit max_length."""
    from lavis.datasets.collators import CaptionCollator
    from lavis.runners.sample_log import DemoIndexCollator

    model, data = setup
    fewshot = FewShotDataset(
        data["caption"]["val"], data["caption"]["train"], num_shots=shots, seed=3, zero_shot_text_demos=True
    )
    items = [fewshot[i] for i in range(len(fewshot))]
    collate = DemoIndexCollator(CaptionCollator(model.tokenizer, "eval", max_length=max_length))
    alone = [prompt_length(collate([item])) for item in items]
    assert collate.prompt_lengths(items) == alone
    if max_length is not None:
        assert max(alone) <= max_length and any(collate([item])["num_demos"] != [shots] for item in items)


def test_classification_prompt_lengths_use_the_items_template_before_any_batch(setup):
    """Hateful Memes' prompt shows each meme's OCR text: bucketing must measure it with that template even
    when no batch has been collated yet (the collator starts with the ImageNet template)."""
    from lavis.datasets.classification import HATEFUL_MEMES_TEMPLATE, ClassificationCollator

    model, _ = setup
    collate = ClassificationCollator(model.tokenizer, "eval", templates={"hateful_memes": HATEFUL_MEMES_TEMPLATE})
    items = [
        {
            "image": torch.zeros(3, 64, 64),
            "text_input": " ".join(["word"] * n),
            "class_set": "hateful_memes",
            "id": n,
            "image_id": n,
            "label": 0,
        }
        for n in (1, 4, 7, 10)
    ]
    lengths = collate.prompt_lengths(items)
    alone = [int(collate([item])["attention_mask"].sum()) for item in items]
    assert lengths == alone and len(set(lengths)) == 4


def test_joint_task_and_plain_collators_tell_the_lengths_of_collating_each_item_alone(setup):
    """caption_vqa's MixedCollator answers with the collator of the items' kind; a task's collator that is a
    plain function gets the lengths of collating each item alone."""
    from lavis.runners.sample_log import DemoIndexCollator
    from lavis.tasks.caption_vqa import CaptionVQATask

    model, data = setup
    collate = DemoIndexCollator(CaptionVQATask(OmegaConf.create({"run": RUN})).collator(model, "eval"))
    for kind in ("caption", "vqa"):
        fewshot = FewShotDataset(data[kind]["val"], data[kind]["train"], num_shots=2, seed=5)
        items = [fewshot[i] for i in range(6)]
        assert collate.prompt_lengths(items) == [prompt_length(collate([item])) for item in items]
    with pytest.raises(DataError, match="mixes caption and VQA samples"):
        collate.prompt_lengths([data["caption"]["val"][0], data["vqa"]["val"][0]])
    plain = DemoIndexCollator(lambda items: {"attention_mask": torch.ones(len(items), 3 + len(items[0]["text"]))})
    assert plain.prompt_lengths([{"text": "ab"}, {"text": "abcd"}]) == [5, 7]

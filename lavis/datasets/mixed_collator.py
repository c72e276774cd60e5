"""The collator of jointly trained captioning and VQA (task ``caption_vqa``, e.g. the shapes demo).

A training batch may mix caption and VQA items: each group is collated by its own collator and the
two batches are padded to one length. An evaluation batch holds one kind of sample (one dataset at a
time) and is collated by that kind's collator.
"""

from __future__ import annotations

import torch

from lavis.common.errors import DataError
from lavis.datasets.collators import Collator
from lavis.datasets.prompts import IGNORE_INDEX


def is_vqa(item_or_batch) -> bool:
    """Whether an item (or a batch) is VQA's: it carries question ids."""
    return "question_id" in item_or_batch


def merge_batches(batches: list[dict], pad_token_id: int) -> dict:
    """One right-padded training batch from several (``lang_x``, ``attention_mask``, ``labels``, ``vision_x``)."""
    if len(batches) == 1:
        return batches[0]
    frames = {b["vision_x"].shape[2:] for b in batches}
    if len(frames) > 1:
        raise DataError(f"cannot mix training batches with different image shapes {sorted(map(tuple, frames))}")
    length = max(b["lang_x"].shape[1] for b in batches)
    num_images = max(b["vision_x"].shape[1] for b in batches)
    fill = {"lang_x": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}

    def padded(batch: dict, key: str) -> torch.Tensor:
        value = batch[key]
        return torch.nn.functional.pad(value, (0, length - value.shape[1]), value=fill[key])

    merged = {key: torch.cat([padded(b, key) for b in batches]) for key in fill}
    # Rows with fewer images get zero images at the end, which no <image> token refers to.
    merged["vision_x"] = torch.cat(
        [torch.nn.functional.pad(b["vision_x"], (0, 0) * 4 + (0, num_images - b["vision_x"].shape[1])) for b in batches]
    )
    return merged


class MixedCollator(Collator):
    """caption_vqa's collator: caption and VQA items collated by their own collators; a training batch
    that holds both is the two batches padded to one length (``merge_batches``)."""

    def __init__(self, caption_collator, vqa_collator, pad_token_id: int):
        self.caption_collator = caption_collator
        self.vqa_collator = vqa_collator
        self.pad_token_id = pad_token_id

    def _eval_collator(self, items: list[dict]) -> Collator:
        """The collator of an evaluation batch's one kind of sample."""
        kinds = {is_vqa(item) for item in items}
        if len(kinds) > 1:
            raise DataError("an evaluation batch mixes caption and VQA samples; evaluate one dataset at a time")
        return self.vqa_collator if kinds == {True} else self.caption_collator

    def prompt_lengths(self, items: list[dict]) -> list[int]:
        return self._eval_collator(items).prompt_lengths(items)

    def __call__(self, items: list[dict]) -> dict:
        if self.caption_collator.role == "eval":
            return self._eval_collator(items)(items)
        vqa = [item for item in items if is_vqa(item)]
        captions = [item for item in items if not is_vqa(item)]
        batches = [c(group) for c, group in ((self.caption_collator, captions), (self.vqa_collator, vqa)) if group]
        return merge_batches(batches, self.pad_token_id)

"""Captioning and VQA trained together on one model (e.g. the shapes demo).

Training batches may mix caption and VQA items: each group is collated by its own
task's collator and the two batches are padded to one length. Evaluation batches
come from one dataset at a time, so each is handled by the task its samples belong to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lavis.common.errors import DataError
from lavis.common.registry import registry
from lavis.datasets.collators import Collator
from lavis.datasets.prompts import IGNORE_INDEX
from lavis.tasks.base import BaseTask, too_small
from lavis.tasks.captioning import CaptioningTask
from lavis.tasks.vqa import VQATask


def _is_vqa(item_or_batch) -> bool:
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
    """Collates caption and VQA items with their own collators (see the module docstring)."""

    def __init__(self, caption_collator, vqa_collator, pad_token_id: int):
        self.caption_collator = caption_collator
        self.vqa_collator = vqa_collator
        self.pad_token_id = pad_token_id

    def _eval_collator(self, items: list[dict]) -> Collator:
        """The collator of an evaluation batch's one kind of sample."""
        kinds = {_is_vqa(item) for item in items}
        if len(kinds) > 1:
            raise DataError("an evaluation batch mixes caption and VQA samples; evaluate one dataset at a time")
        return self.vqa_collator if kinds == {True} else self.caption_collator

    def prompt_lengths(self, items: list[dict]) -> list[int]:
        return self._eval_collator(items).prompt_lengths(items)

    def __call__(self, items: list[dict]) -> dict:
        if self.caption_collator.role == "eval":
            return self._eval_collator(items)(items)
        vqa = [item for item in items if _is_vqa(item)]
        captions = [item for item in items if not _is_vqa(item)]
        batches = [c(group) for c, group in ((self.caption_collator, captions), (self.vqa_collator, vqa)) if group]
        return merge_batches(batches, self.pad_token_id)


@registry.register_task("caption_vqa")
class CaptionVQATask(BaseTask):
    """Joint captioning + VQA: the datasets decide which samples are which."""

    sample_id_key = "image_id"

    @dataclass
    class Config(CaptioningTask.Config, VQATask.Config):
        """Keys of the ``run`` section: the captioning keys, the VQA ones (read by the VQA half) and those below."""

        # Generation of a caption stops at <|endofchunk|> or after this many new tokens (VQA: vqa_max_new_tokens).
        max_new_tokens: int = 20
        # New tokens generated for a VQA answer (max_new_tokens applies to captions).
        vqa_max_new_tokens: int = 5
        # Normalise every VQA answer (default: the official evaluation's rule).
        always_normalize: bool = False

        def metric_names(self) -> list[str]:
            both = [*CaptioningTask.Config.metric_names(self), *VQATask.Config.metric_names(self)]
            return list(dict.fromkeys(both))

        def validate(self, path: str) -> list[str]:
            return super().validate(path) + too_small(path, self, {"vqa_max_new_tokens": 1})

    def __init__(self, cfg):
        super().__init__(cfg)
        # The halves read their keys from this task's section (it holds both tasks' keys).
        self.captioning = CaptioningTask(cfg, self.run_cfg)
        self.vqa = VQATask(cfg, self.run_cfg)

    def collator(self, model, role: str):
        return MixedCollator(
            self.captioning.collator(model, role), self.vqa.collator(model, role), model.tokenizer.pad_token_id
        )

    def valid_step(self, model, batch) -> list[dict]:
        if _is_vqa(batch):
            texts = self.generate_text(model, batch, max_new_tokens=self.run_cfg.vqa_max_new_tokens)
            return self.vqa.records(batch, texts)
        return self.captioning.records(batch, self.generate_text(model, batch))

    def evaluate(self, records: list[dict], split: str, dataset, result_dir=None) -> dict:
        task = self.vqa if dataset.sample_id_key == "question_id" else self.captioning
        return task.evaluate(records, split, dataset, result_dir)

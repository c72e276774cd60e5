"""Captioning and VQA trained together on one model (e.g. the shapes demo).

Training batches may mix caption and VQA items (``lavis.datasets.mixed_collator.MixedCollator``:
each group is collated by its own task's collator and the two batches are padded to one
length). Evaluation batches come from one dataset at a time, so each is handled by the task
its samples belong to.
"""

from __future__ import annotations

from dataclasses import dataclass

from lavis.common.registry import registry
from lavis.datasets.mixed_collator import MixedCollator, is_vqa
from lavis.tasks.base import BaseTask, too_small
from lavis.tasks.captioning import CaptioningTask
from lavis.tasks.vqa import VQATask


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
        if is_vqa(batch):
            texts = self.generate_text(model, batch, max_new_tokens=self.run_cfg.vqa_max_new_tokens)
            return self.vqa.records(batch, texts)
        return self.captioning.records(batch, self.generate_text(model, batch))

    def evaluate(self, records: list[dict], split: str, dataset, result_dir=None) -> dict:
        task = self.vqa if dataset.sample_id_key == "question_id" else self.captioning
        return task.evaluate(records, split, dataset, result_dir)

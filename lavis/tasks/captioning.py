"""Image captioning: generate a caption per image, score with pycocoevalcap (CIDEr by default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lavis.common.registry import registry
from lavis.metrics.postprocess import postprocess_caption, postprocess_caption_v2
from lavis.tasks.base import BaseTask, FewShotConfig, GenerationConfig, InContextTrainingConfig


@registry.register_task("captioning")
class CaptioningTask(BaseTask):
    """COCO-style captioning; records are ``{"image_id", "caption"}``."""

    sample_id_key = "image_id"

    @dataclass
    class Config(GenerationConfig, FewShotConfig, InContextTrainingConfig):
        """Captioning keys of the ``run`` section."""

        # pycocoevalcap metrics of eval splits (they need Java): any of BLEU, METEOR, ROUGE_L, CIDEr, SPICE.
        metrics: list[str] = field(default_factory=lambda: ["CIDEr", "BLEU", "ROUGE_L"])
        # Score reported as agg_metrics (best checkpoint, few-shot table): a key of metrics' output,
        # e.g. CIDEr, Bleu_4, METEOR, ROUGE_L, SPICE.
        agg_metric: str = "CIDEr"
        # Generation -> caption: default = cut at "Output", drop '"', strip; openflamingo_v2 = the same
        # without the strip, exactly v2's (lavis/metrics/postprocess.py).
        caption_postprocess: Literal["default", "openflamingo_v2"] = "default"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.check_agg_metric()

    @classmethod
    def metric_names(cls, run) -> list[str]:
        from lavis.common.errors import ConfigError
        from lavis.metrics.caption import METRIC_KEYS, resolve_metrics

        try:
            scores = [key for name in resolve_metrics(list(run.get("metrics") or [])) for key in METRIC_KEYS[name]]
        except ConfigError:
            scores = []  # reported by check_agg_metric when the task is built
        return ["agg_metrics", *scores]

    def check_agg_metric(self) -> None:
        """``run.agg_metric`` must be one of the scores ``run.metrics`` produces (checked before any work)."""
        from lavis.common.errors import ConfigError
        from lavis.metrics.caption import METRIC_KEYS, resolve_metrics

        keys = [key for name in resolve_metrics(list(self.run_cfg.metrics)) for key in METRIC_KEYS[name]]
        if self.run_cfg.agg_metric not in keys:
            raise ConfigError(
                f"run.agg_metric: {self.run_cfg.agg_metric!r} is not a score of run.metrics "
                f"{list(self.run_cfg.metrics)}; choose one of {', '.join(keys)}"
            )

    def collator(self, model, role: str):
        from lavis.datasets.collators import CaptionCollator

        return CaptionCollator(model.tokenizer, role=role, demo_separator=self.run_cfg.get("demo_separator", ""))

    def valid_step(self, model, batch) -> list[dict]:
        return self.records(batch, self.generate_text(model, batch))

    def records(self, batch, texts: list[str]) -> list[dict]:
        """Result records of a batch from its generated texts."""
        clean = (
            postprocess_caption_v2
            if self.run_cfg.get("caption_postprocess") == "openflamingo_v2"
            else postprocess_caption
        )
        return [
            # resps: the raw generation, for the per-sample log (lavis/runners/sample_log.py)
            {"image_id": int(image_id), "caption": clean(text), "resps": text}
            for image_id, text in zip(batch["image_id"], texts)
        ]

    def evaluate(self, records: list[dict], split: str, dataset, result_dir=None) -> dict:
        from lavis.metrics.caption import caption_sample_scores, write_caption_results
        from lavis.runners.sample_log import SAMPLES_KEY

        path = self.result_path(result_dir, split, "_caption")
        if path is not None:
            write_caption_results(records, path)
        if dataset.annotation_file is None:
            from lavis.common.errors import DataError

            raise DataError(
                f"split {split!r} has no caption ground truth to score against (a demo pool needs none); set "
                f"datasets.<name>.build_info.annotations.{split} to the official captions_*.json"
            )
        metrics, per_image = caption_sample_scores(
            dataset.annotation_file, records, metrics=tuple(self.run_cfg.metrics)
        )
        metrics["agg_metrics"] = metrics[self.run_cfg.agg_metric]
        metrics[SAMPLES_KEY] = per_image
        return metrics

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

        def scores(self) -> list[str] | None:
            """The keys ``metrics`` produce (None when it names an unknown metric: a problem of ``validate``)."""
            from lavis.common.errors import ConfigError
            from lavis.metrics.caption import METRIC_KEYS, resolve_metrics

            try:
                return [key for name in resolve_metrics(self.metrics) for key in METRIC_KEYS[name]]
            except ConfigError:
                return None

        def metric_names(self) -> list[str]:
            return ["agg_metrics", *(self.scores() or [])]

        def agg_metric_label(self) -> str:
            return self.agg_metric

        def validate(self, path: str) -> list[str]:
            from lavis.common.errors import ConfigError
            from lavis.metrics.caption import resolve_metrics

            problems = super().validate(path)
            keys = self.scores()
            if keys is None:
                try:
                    resolve_metrics(self.metrics)
                except ConfigError as err:
                    problems.append(f"{path}.metrics: {err}")
            elif self.agg_metric not in keys:
                problems.append(
                    f"{path}.agg_metric: {self.agg_metric!r} is not a score of {path}.metrics "
                    f"{self.metrics}; choose one of {', '.join(keys)}"
                )
            return problems

    def collator(self, model, role: str):
        from lavis.datasets.collators import CaptionCollator

        return CaptionCollator(model.tokenizer, role=role, demo_separator=self.run_cfg.demo_separator)

    def valid_step(self, model, batch) -> list[dict]:
        return self.records(batch, self.generate_text(model, batch))

    def records(self, batch, texts: list[str]) -> list[dict]:
        """Result records of a batch from its generated texts."""
        clean = postprocess_caption_v2 if self.run_cfg.caption_postprocess == "openflamingo_v2" else postprocess_caption
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

"""Rank classification (Hateful Memes, ImageNet): score every class name after the prompt, pick the best.

Each evaluation batch is the few-shot context (demonstrations with their class names + the query prompt);
``model.score`` gives every class name's mean log-probability per token (``normalize_length``, as
OpenFlamingo v2) with the context encoded once and its KV cache shared by the candidates. With
``run.classification_prompt_ensembling`` the scores are averaged over up to 6 orders of the demonstrations.
Records are ``{"id", "label", "class_logprobs"}``; the metric is the data set's (lavis/metrics/classification.py):
ROC AUC of p(yes) for Hateful Memes, top-1/top-5 by class name for ImageNet.

``run.compat_openflamingo_v2_zero_shot_classification`` (default off) reproduces v2's 0-shot bug: with its
two text-only demonstrations the demo images are still passed while their ``<image>`` tags are stripped,
so the query's ``<image>`` attends the first demonstration's image instead of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lavis.common.errors import ConfigError, DataError
from lavis.common.registry import registry
from lavis.tasks.base import BaseTask, FewShotConfig, InContextTrainingConfig, too_small

PROMPT_ENSEMBLE_SIZE = 6  # OpenFlamingo's min(6, shots!) permutations


@dataclass
class ClassSet:
    """The classes of one data set and how they are prompted and scored."""

    names: list[str]
    kind: str  # hateful_memes | imagenet


@registry.register_task("classification")
class ClassificationTask(BaseTask):
    """Rank classification over each data set's class names (see the module docstring)."""

    sample_id_key = "id"

    @dataclass
    class Config(FewShotConfig, InContextTrainingConfig):
        """Classification keys of the ``run`` section."""

        # Average the class scores over up to 6 orders of the demonstrations (OpenFlamingo's option).
        classification_prompt_ensembling: bool = False
        # Reproduce OpenFlamingo v2's 0-shot bug (the query's <image> attends the first text demo's image).
        compat_openflamingo_v2_zero_shot_classification: bool = False
        # Class names scored in one forward over the cached context (memory vs. speed).
        score_batch_size: int = 100

        def metric_names(self) -> list[str]:
            """Hateful Memes: roc_auc, accuracy; ImageNet: top1_accuracy, top5_accuracy; agg_metrics = the first."""
            return ["agg_metrics", "roc_auc", "accuracy", "top1_accuracy", "top5_accuracy"]

        def validate(self, path: str) -> list[str]:
            return super().validate(path) + too_small(path, self, {"score_batch_size": 1})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.class_sets: dict[str, ClassSet] = {}
        self._token_ids: dict[tuple[int, str], list[list[int]]] = {}

    def build_datasets(self, datasets_cfg) -> dict:
        """The datasets, remembering each one's class names and kind (builders with ``class_names()``)."""
        for name, section in datasets_cfg.items():
            builder = registry.get("builder", name)(section)
            if builder.classification_kind is None:
                raise ConfigError(
                    f"datasets.{name}: the classification task needs a classification data set "
                    "(hateful_memes, imagenet or their shapes_ stand-ins)"
                )
            builder.prepare()  # a stand-in's class names are those of its generated files
            self.class_sets[name] = ClassSet(builder.class_names(), builder.classification_kind)
        return super().build_datasets(datasets_cfg)

    @property
    def text_demos_keep_images(self) -> bool:
        # v2's 0-shot bug: the query's <image> attends the first text-only demonstration's image.
        return bool(self.run_cfg.compat_openflamingo_v2_zero_shot_classification)

    def collator(self, model, role: str):
        from lavis.datasets.classification import (
            HATEFUL_MEMES_TEMPLATE,
            IMAGENET_TEMPLATE,
            ClassificationCollator,
        )

        templates = {"hateful_memes": HATEFUL_MEMES_TEMPLATE, "imagenet": IMAGENET_TEMPLATE}
        run = self.run_cfg
        return ClassificationCollator(
            model.tokenizer,
            role=role,
            templates={n: templates[c.kind] for n, c in self.class_sets.items()},
            compat_zero_shot=bool(run.compat_openflamingo_v2_zero_shot_classification),
            permutations=PROMPT_ENSEMBLE_SIZE if run.classification_prompt_ensembling else 1,
        )

    def class_token_ids(self, tokenizer, class_set: str) -> list[list[int]]:
        """Each class name's token ids as a continuation (no special tokens), cached per tokenizer."""
        key = (id(tokenizer), class_set)
        if key not in self._token_ids:
            names = self.class_set(class_set).names
            self._token_ids[key] = [list(ids) for ids in tokenizer(names, add_special_tokens=False)["input_ids"]]
        return self._token_ids[key]

    def class_set(self, name: str) -> ClassSet:
        """The class set of data set ``name``."""
        if name not in self.class_sets:
            raise DataError(f"classification: no class names known for data set {name!r} (built through the task?)")
        return self.class_sets[name]

    def valid_step(self, model, batch) -> list[dict]:
        class_set = batch["class_set"][0]
        continuations = self.class_token_ids(model.tokenizer, class_set)
        views = [batch, *batch.get("views", [])]
        scores = torch.stack(
            [
                model.score(
                    v["vision_x"],
                    v["lang_x"],
                    v["attention_mask"],
                    continuations,
                    normalize_length=True,
                    batch_size=self.run_cfg.score_batch_size,
                ).float()
                for v in views
            ]
        ).mean(dim=0)
        return [
            {"id": sample_id, "label": int(label), "class_set": class_set, "class_logprobs": row}
            for sample_id, label, row in zip(batch["id"], batch["label"], scores.cpu().tolist())
        ]

    def evaluate(self, records: list[dict], split: str, dataset, result_dir=None) -> dict:
        from lavis.common.fileio import atomic_write_json
        from lavis.metrics.classification import hateful_memes_metrics, imagenet_metrics
        from lavis.runners.sample_log import SAMPLES_KEY

        if not records:
            raise DataError(f"classification {split}: no records to score")
        names = {r.get("class_set") for r in records} - {None}
        class_set = self.class_set(_dataset_name(dataset, names))
        labels = [r["label"] for r in records]
        scores = [r["class_logprobs"] for r in records]
        samples: dict = {}
        if class_set.kind == "hateful_memes":
            out = hateful_memes_metrics(labels, scores)
            metrics = {"roc_auc": out["roc_auc"], "accuracy": out["accuracy"], "agg_metrics": out["roc_auc"]}
            for r, p_yes, pred in zip(records, out["p_yes"], out["pred"]):
                samples[r["id"]] = {
                    "target": class_set.names[r["label"]],
                    "filtered_resps": class_set.names[pred],
                    "p_yes": p_yes,
                    "correct": int(pred == r["label"]),
                }
        else:
            out = imagenet_metrics(labels, scores, class_set.names)
            metrics = {
                "top1_accuracy": out["top1_accuracy"],
                "top5_accuracy": out["top5_accuracy"],
                "agg_metrics": out["top1_accuracy"],
            }
            for r, top5, ok1, ok5 in zip(records, out["top5"], out["top1_correct"], out["top5_correct"]):
                samples[r["id"]] = {
                    "target": class_set.names[r["label"]],
                    "filtered_resps": class_set.names[top5[0]],
                    "top5": [class_set.names[i] for i in top5],
                    "top1_correct": int(ok1),
                    "top5_correct": int(ok5),
                }
        path = self.result_path(result_dir, split, "_classification")
        if path is not None:
            atomic_write_json(
                path, [{"id": r["id"], "label": r["label"], "class_logprobs": r["class_logprobs"]} for r in records]
            )
        metrics[SAMPLES_KEY] = samples
        return metrics


def _dataset_name(dataset, names: set) -> str:
    if len(names) == 1:
        return next(iter(names))
    raise DataError(f"classification: the records of one split must come from one data set, got {sorted(names)}")

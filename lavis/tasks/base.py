"""What every task shares: building the model and data, the training loss, generation.

A task owns the meaning of its samples and metrics and nothing about processes:
the runner shards, gathers and de-duplicates; the task turns one batch into a
loss or into records, and records into metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from lavis.common.config import run_section
from lavis.common.registry import registry
from lavis.common.schema import Validated
from lavis.datasets.prompts import IGNORE_INDEX


@dataclass
class TaskConfig(Validated):
    """Base of a task's ``Config``: its keys of the ``run`` section.

    The loader merges it with the runner's keys into one flat section (``schema.merged_schema``): each
    ``validate`` checks its own keys, and the runner's checks ``run.best_metric`` against ``metric_names``.
    """

    def metric_names(self) -> list[str]:
        """Names of the metrics the task's ``evaluate`` returns with these settings (``run.best_metric`` is one)."""
        return ["agg_metrics"]

    def agg_metric_label(self) -> str:
        """What ``agg_metrics`` is, for tables and the end-of-run summary."""
        return "agg_metrics"


def too_small(path: str, config, lows: dict[str, int]) -> list[str]:
    """``<path>.<key>: must be >= low`` for each key of ``config`` below its bound (None = not set)."""
    return [
        f"{path}.{key}: must be >= {low}, got {getattr(config, key)}"
        for key, low in lows.items()
        if getattr(config, key) is not None and getattr(config, key) < low
    ]


@dataclass
class GenerationConfig(TaskConfig):
    """Decoding settings used by ``valid_step`` (keys of the ``run`` section)."""

    num_beams: int = 3  # beams of beam search when generating for evaluation (1 = greedy)
    # Generation stops at <|endofchunk|> or after this many new tokens (caption_vqa: captions only).
    max_new_tokens: int = 20
    min_new_tokens: int = 0  # <|endofchunk|> is suppressed until this many new tokens are generated
    # Beam search divides a beam's log-probability by length^length_penalty: < 0 favours shorter
    # outputs, > 0 longer ones; no effect when num_beams is 1.
    length_penalty: float = -2.0

    def validate(self, path: str) -> list[str]:
        problems = super().validate(path) + too_small(
            path, self, {"num_beams": 1, "max_new_tokens": 1, "min_new_tokens": 0}
        )
        if 1 <= self.max_new_tokens < self.min_new_tokens:
            problems.append(
                f"{path}.min_new_tokens: must be <= {path}.max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        return problems


@dataclass
class InContextTrainingConfig(TaskConfig):
    """Interleaved (few-shot) training (a key of the ``run`` section)."""

    # Each training sample is preceded by 0..train_max_shots random demonstrations of its split (0 = off).
    train_max_shots: int = 0

    def validate(self, path: str) -> list[str]:
        return super().validate(path) + too_small(path, self, {"train_max_shots": 0})


@dataclass
class FewShotConfig(TaskConfig):
    """Few-shot evaluation settings (keys of the ``run`` section, used by evaluate.py)."""

    # Demonstrations per query to evaluate, one table column each (0 = zero-shot, see zero_shot_text_demos).
    num_shots: list[int] = field(default_factory=lambda: [0])
    # Evaluations per shot count, each with its own demonstrations; the table gives mean ± std over them.
    num_trials: int = 1
    # Seed of each trial's demonstration draw (at least num_trials of them); the first also picks num_samples.
    trial_seeds: list[int] = field(default_factory=lambda: [42])
    # Queries per evaluated split: one seeded subset shared by every shot count and trial; null = whole split.
    num_samples: Optional[int] = None
    # Split of each dataset that demonstrations come from (never the query's own image or question).
    demo_split: str = "train"
    # Random demonstrations come from a seeded subset of this many demo_split samples, drawn once per trial
    # (OpenFlamingo v2's query set: 2048); null = the whole split. RICES always searches the whole split.
    demo_pool_size: Optional[int] = None
    # Text put after each demonstration in the prompt: OpenFlamingo v2's captioning and VQA use "\n".
    demo_separator: str = ""
    # random: seeded random demonstrations; rices: the most similar demo_split images (CLIP embedding).
    demo_method: Literal["random", "rices"] = "random"
    # Where RICES caches the demo_split image features; null = <run dir>/rices.
    rices_cache_dir: Optional[str] = None
    # 0 shots: prompt with 2 text-only demonstrations, without their images (OpenFlamingo's protocol).
    zero_shot_text_demos: bool = True
    # Published numbers the run report draws beside this run's few-shot curve (lavis/report/references.py).
    reference_results: Optional[Literal["openflamingo-9b"]] = None

    def validate(self, path: str) -> list[str]:
        problems = super().validate(path) + too_small(path, self, {"num_trials": 1, "num_samples": 1})
        if any(n < 0 for n in self.num_shots):
            problems.append(f"{path}.num_shots: shot counts must be >= 0, got {self.num_shots}")
        if self.num_trials >= 1 and len(self.trial_seeds) < self.num_trials:
            problems.append(
                f"{path}.trial_seeds: {self.num_trials} trial(s) need as many seeds, got {self.trial_seeds}"
            )
        return problems


class BaseTask:
    """What every task provides (the runner's and evaluation's contract) and what the LM tasks share.

    A task declares ``sample_id_key`` and its ``Config`` (a ``TaskConfig``: its run keys, their checks and
    its ``metric_names``) and implements ``collator``, ``valid_step`` and ``evaluate``; ``loss_count`` and
    ``train_step`` here serve every task whose batches carry LM labels.
    """

    #: The key of a record's (and a dataset item's) sample id, e.g. image_id or question_id.
    sample_id_key: str = "id"
    #: The task's keys of the run section (a subclass of TaskConfig).
    Config = TaskConfig

    def __init__(self, cfg, run=None):
        """``cfg`` the validated config; ``run`` its typed run section when another task already holds it
        (caption_vqa's halves share its section)."""
        self.cfg = cfg
        self.run_cfg = run if run is not None else run_section(cfg.run, type(self).Config)

    @property
    def text_demos_keep_images(self) -> bool:
        """Whether OpenFlamingo's text-only 0-shot demonstrations still pass their images to the model.
        They do not (so their images are not even read) except in a task's compatibility mode."""
        return False

    def collator(self, model, role: str):
        """``items -> batch`` for ``role`` train or eval (model inputs, labels for train, the sample ids)."""
        raise NotImplementedError

    def valid_step(self, model, batch) -> list[dict]:
        """One record per sample of an evaluation batch, keyed by ``sample_id_key``."""
        raise NotImplementedError

    def evaluate(self, records: list[dict], split: str, dataset, result_dir: Optional[Path]) -> dict:
        """Metrics of a split's de-duplicated records (with ``agg_metrics``); result files go to ``result_dir``."""
        raise NotImplementedError

    @classmethod
    def setup_task(cls, cfg):
        """The task for a validated config."""
        return cls(cfg)

    def build_model(self, model_cfg):
        """The model named by the ``model`` section."""
        from lavis.models import build_model

        return build_model(model_cfg)

    def build_datasets(self, datasets_cfg) -> dict:
        """``{dataset_name: {split: Dataset}}`` from the ``datasets`` section.

        With ``run.train_max_shots`` the training splits carry in-context demonstrations.
        """
        from lavis.datasets.fewshot import InContextTrainingDataset

        datasets = {
            name: registry.get("builder", name)(section).build_datasets() for name, section in datasets_cfg.items()
        }
        max_shots = self.run_cfg.train_max_shots
        if max_shots:
            for by_split in datasets.values():
                for split in self.run_cfg.train_splits:
                    if split in by_split:
                        by_split[split] = InContextTrainingDataset(by_split[split], max_shots, self.run_cfg.seed)
        return datasets

    def loss_count(self, batch) -> int:
        """The number of target tokens of a training batch (on the CPU): what ``train_step`` sums over.

        A causal LM predicts token ``t + 1`` at position ``t``, so the first label never counts.
        """
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def train_step(self, model, batch):
        """The language-modelling loss of one batch SUMMED over its target tokens (labels mask the rest).

        The runner divides by the count of the whole step (see ``lavis/runners/objective.py``). The model's
        ``.loss`` is its mean over the batch's targets plus the model's ``training_loss_extras``;
        times the count, the extras weigh by the batch's share of the step's targets, so the step's
        objective is the global token mean plus the extras once.
        """
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss = model(
            vision_x=batch["vision_x"],
            lang_x=batch["lang_x"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            # The loss alone: the output head and the cross-entropy run only where a label is predicted.
            loss_only=True,
            # HF's causal-LM loss: the sum over targets divided by this; 1 for a batch without targets
            # (all masked: a loss of 0 rather than the NaN of an empty mean).
            num_items_in_batch=count.clamp(min=1),
        ).loss
        return loss * count

    def generation_kwargs(self) -> dict:
        """Decoding settings from the run section."""
        run = self.run_cfg
        return {
            "num_beams": run.num_beams,
            "max_new_tokens": run.max_new_tokens,
            "min_new_tokens": run.min_new_tokens,
            "length_penalty": run.length_penalty,
        }

    def generate_text(self, model, batch, **overrides) -> list[str]:
        """Decoded new text for every sample of an evaluation batch (``overrides`` change decoding keys)."""
        new_tokens = model.generate(
            vision_x=batch["vision_x"],
            lang_x=batch["lang_x"],
            attention_mask=batch["attention_mask"],
            **{**self.generation_kwargs(), **overrides},
        )
        from lavis.models.decoding import decode_texts

        return decode_texts(model.tokenizer, new_tokens)

    @staticmethod
    def result_path(result_dir: Optional[Path], split: str, suffix: str = "") -> Optional[Path]:
        """Where the results of ``split`` are written under ``result_dir`` (None: written nowhere)."""
        if result_dir is None:
            return None
        return Path(result_dir) / f"{split}{suffix}_results.json"

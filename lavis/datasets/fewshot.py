"""Few-shot evaluation data: demonstrations for every query, drawn at random or by RICES.

:class:`FewShotDataset` wraps a query dataset; its item ``i`` is the query item plus ``"demos"``,
a list of ``k`` pool items that the eval collators render, in training format, before the query.

Reproducibility: the demonstrations of query ``i`` depend only on ``(seed, trial, i)`` (and, for
RICES, on the image features), never on the process, the DataLoader worker or the order of
access, so every DDP rank and worker count sees the same prompts, and trials differ.

A demonstration never shows the query's own sample: pool items with the query's ``image_id`` or
``question_id`` are excluded (for VQA this also rules out other questions about the same image).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from lavis.common.errors import ConfigError, DataError
from lavis.datasets.prompts import DEMOS_KEY, TEXT_ONLY_DEMOS_KEY
from lavis.datasets.rices import RICES, item_ids
from lavis.datasets.samples import DatasetView

logger = logging.getLogger(__name__)

# OpenFlamingo's 0-shot prompt: two demonstrations with their <image> removed and no images.
ZERO_SHOT_TEXT_DEMOS = 2
# RICES ranks this many extra candidates so that excluded ones (same image) rarely force a full sort.
RICES_MARGIN = 32

__all__ = ["FewShotDataset", "InContextTrainingDataset", "RICES", "random_demo_indices", "rices_demo_indices"]


def _rng(seed: int, trial: int, index: int) -> np.random.Generator:
    # SeedSequence hashes the three numbers together: neighbouring queries, trials and seeds get
    # unrelated streams, independent of process and worker.
    return np.random.default_rng(np.random.SeedSequence([seed, trial, index]))


def shares_sample(query_ids: tuple, candidate_ids: tuple) -> bool:
    """True when two ``(image_id, question_id)`` pairs share an image or a question."""
    return any(q is not None and q == c for q, c in zip(query_ids, candidate_ids))


def random_demo_indices(
    pool_size: int,
    k: int,
    seed: int,
    trial: int,
    index: int,
    is_excluded: Callable[[int], bool],
) -> list[int]:
    """``k`` distinct pool indices for query ``index``, in draw order, skipping excluded ones.

    Raises DataError when the pool has fewer than ``k`` admissible items.
    """
    rng = _rng(seed, trial, index)
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < k:
        if len(seen) == pool_size:
            raise DataError(
                f"query {index}: the demo pool has only {len(chosen)} admissible items, {k} demos are needed"
            )
        candidate = int(rng.integers(pool_size))
        if candidate in seen:
            continue
        seen.add(candidate)
        if not is_excluded(candidate):
            chosen.append(candidate)
    return chosen


def rices_demo_indices(
    similarities: torch.Tensor,
    k: int,
    query_ids: Sequence[tuple],
    pool_ids: Sequence[tuple],
) -> list[list[int]]:
    """For each row of ``similarities`` (queries x pool), the ``k`` most similar admissible pool
    indices, most similar LAST (closest to the query in the prompt)."""
    pool_size = similarities.shape[1]
    width = min(pool_size, k + RICES_MARGIN)
    top = similarities.topk(width, dim=1).indices.tolist()
    out = []
    for row, (ids, candidates) in enumerate(zip(query_ids, top)):
        admissible = [j for j in candidates if not shares_sample(ids, pool_ids[j])]
        if len(admissible) < k and width < pool_size:
            order = similarities[row].argsort(descending=True, stable=True).tolist()
            admissible = [j for j in order if not shares_sample(ids, pool_ids[j])]
        if len(admissible) < k:
            raise DataError(f"query {ids}: the demo pool has only {len(admissible)} admissible items, {k} needed")
        out.append(admissible[:k][::-1])
    return out


class FewShotDataset(DatasetView):
    """``query_ds`` with ``k`` demonstrations from ``pool_ds`` attached to every item.

    Args:
        query_ds: the evaluated split (its items get ``"demos"``).
        pool_ds: where demonstrations come from (usually the training split).
        num_shots: demonstrations per query.
        seed, trial: the random draw is seeded by ``(seed, trial, query index)``.
        method: ``random`` or ``rices`` (retrieval by CLIP image similarity; needs ``rices``).
        zero_shot_text_demos: with ``num_shots == 0``, OpenFlamingo's convention: 2 demonstrations
            rendered without ``<image>`` and without their images (items get ``demos_text_only``).
        rices: a :class:`RICES` index over ``pool_ds``. Query features are computed here, once, in
            the constructing process (before DataLoader workers start).
        pool_size: random demonstrations come only from this many pool items, a subset drawn once from
            ``(seed, trial)`` (OpenFlamingo v2's 2048-sample query set); None = the whole pool. RICES
            ignores it (v2's RICES searches the whole training split).
        text_demos_keep_images: text-only demonstrations are loaded with their images (a task's
            compatibility mode, ``BaseTask.text_demos_keep_images``); by default their images are not read.

    The dataset contract (``sample_id_key``, ``sample_ids()``, ``annotation_file``...) is the query
    dataset's (:class:`DatasetView`).
    """

    def __init__(
        self,
        query_ds,
        pool_ds,
        num_shots: int,
        seed: int,
        trial: int = 0,
        method: Literal["random", "rices"] = "random",
        zero_shot_text_demos: bool = False,
        rices: RICES | None = None,
        pool_size: int | None = None,
        text_demos_keep_images: bool = False,
    ):
        for name, value in (("num_shots", num_shots), ("seed", seed), ("trial", trial)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"few-shot {name} must be a non-negative integer, got {value!r}")
        if pool_size is not None and (not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1):
            raise ConfigError(f"few-shot demo pool size must be a positive integer or null, got {pool_size!r}")
        if method not in ("random", "rices"):
            raise ConfigError(f"few-shot method must be 'random' or 'rices', got {method!r}")
        super().__init__(query_ds)
        self.query_ds = query_ds
        self.pool_ds = pool_ds
        self.num_shots = num_shots
        self.seed = seed
        self.trial = trial
        self.method = method
        self.text_only = num_shots == 0 and zero_shot_text_demos
        self.num_demos = ZERO_SHOT_TEXT_DEMOS if self.text_only else num_shots
        # Text-only demonstrations show no image: build them from their records, without decoding one.
        self._demo_item = pool_ds.text_item if self.text_only and not text_demos_keep_images else pool_ds.__getitem__
        self._rices_choice: list[list[int]] | None = None
        # Pool indices random demonstrations may come from (None = all); a separate stream from the draws.
        self.pool_subset: list[int] | None = None
        if pool_size is not None and pool_size < len(pool_ds):
            rng = np.random.default_rng(np.random.SeedSequence([seed, trial, len(pool_ds), pool_size]))
            self.pool_subset = sorted(int(j) for j in rng.choice(len(pool_ds), size=pool_size, replace=False))
        if method == "rices" and self.num_demos > 0:
            if rices is None:
                raise ConfigError("few-shot method 'rices' needs a RICES index over the demo pool (rices=...)")
            if len(rices) != len(pool_ds):
                raise ConfigError(f"the RICES index covers {len(rices)} items but the demo pool has {len(pool_ds)}")
            # Only the ranking is kept: the index holds the encoder, which DataLoader workers must not copy.
            self._rices_choice = self._rank_by_rices(rices)

    def _rank_by_rices(self, rices: RICES) -> list[list[int]]:
        features, query_ids = rices.dataset_features(self.query_ds)
        choice: list[list[int]] = []
        for start in range(0, len(features), rices.batch_size):
            block = slice(start, start + rices.batch_size)
            choice += rices_demo_indices(
                rices.similarities(features[block]), self.num_demos, query_ids[block], rices.pool_ids
            )
        return choice

    def __len__(self) -> int:
        return len(self.query_ds)

    def demo_indices(self, index: int) -> list[int]:
        """Pool indices of the demonstrations of query ``index`` (in prompt order)."""
        return self._draw(index, self.query_ds[index], {})

    def _draw(self, index: int, query: dict, loaded: dict[int, dict]) -> list[int]:
        if self.num_demos == 0:
            return []
        if self._rices_choice is not None:
            return list(self._rices_choice[index])

        def load(j: int) -> dict:
            # A random draw reads candidates' ids from the items; keep them, the chosen ones are the demos.
            if j not in loaded:
                loaded[j] = self._demo_item(j)
            return loaded[j]

        query_ids = item_ids(query)
        subset = self.pool_subset
        to_pool = (lambda j: j) if subset is None else subset.__getitem__
        chosen = random_demo_indices(
            len(self.pool_ds) if subset is None else len(subset),
            self.num_demos,
            self.seed,
            self.trial,
            index,
            lambda j: shares_sample(query_ids, item_ids(load(to_pool(j)))),
        )
        return [to_pool(j) for j in chosen]

    def __getitem__(self, index: int) -> dict:
        query = dict(self.query_ds[index])
        loaded: dict[int, dict] = {}
        indices = self._draw(index, query, loaded)
        query[DEMOS_KEY] = [loaded[j] if j in loaded else self._demo_item(j) for j in indices]
        query["demo_indices"] = indices
        if self.text_only:
            query[TEXT_ONLY_DEMOS_KEY] = True
        return query


class InContextTrainingDataset(DatasetView):
    """Training samples preceded by 0..``max_shots`` demonstrations from the same split.

    Flamingo learns few-shot prompting from interleaved sequences; a model fine-tuned only on
    single-image prompts reads a k-shot prompt as something it never saw. Here sample ``i`` gets
    ``k ~ U{0..max_shots}`` random demonstrations (never sharing its image or question), drawn from
    ``(seed, i)`` like :class:`FewShotDataset`, so every rank and worker builds the same sequence.
    The training collator renders them before the sample and labels only the sample's target.
    """

    def __init__(self, dataset, max_shots: int, seed: int):
        if not isinstance(max_shots, int) or max_shots < 0:
            raise ConfigError(f"in-context training needs a non-negative max_shots, got {max_shots!r}")
        super().__init__(dataset)
        self.dataset = dataset
        self.max_shots = max_shots
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def num_shots(self, index: int) -> int:
        """The number of demonstrations before sample ``index`` (drawn from ``(seed, index)``)."""
        return int(_rng(self.seed, 1, index).integers(self.max_shots + 1))

    def image_counts(self) -> list[int]:
        """Each sample's images: its demonstrations' and its own (no item is loaded)."""
        return [self.num_shots(i) + 1 for i in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        k = self.num_shots(index)
        loaded: dict[int, dict] = {}

        def load(j: int) -> dict:
            if j not in loaded:
                loaded[j] = self.dataset[j]
            return loaded[j]

        ids = item_ids(item)
        chosen = random_demo_indices(
            len(self.dataset), k, self.seed, 2, index, lambda j: shares_sample(ids, item_ids(load(j)))
        )
        item[DEMOS_KEY] = [load(j) for j in chosen]
        return item

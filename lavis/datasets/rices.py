"""RICES: Retrieval-based In-Context Example Selection (Yang et al. 2022, as used by OpenFlamingo).

Demonstrations for a query are the pool items whose images are most similar to the query image,
by cosine similarity of image features (OpenFlamingo uses its own CLIP vision encoder). The pool's
L2-normalised features are computed once and cached on disk; the cache records what it was computed
from (the pool's ids and the feature function's name), so a cache of another pool or encoder is
recomputed instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lavis.common.errors import DataError
from lavis.common.fileio import atomic_writer

logger = logging.getLogger(__name__)

CACHE_FORMAT = "pet-vlm/rices-features/v1"
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def item_ids(item: dict) -> tuple:
    """``(image_id, question_id)`` of a dataset item (None where the item has no such key)."""
    return (item.get("image_id"), item.get("question_id"))


def _collate_images(items: Sequence[dict]):
    for item in items:
        if not isinstance(item.get("image"), torch.Tensor):
            raise DataError(f"item {item_ids(item)}: RICES needs item['image'] as a processed image tensor")
    return torch.stack([item["image"] for item in items]), [item_ids(item) for item in items]


class RICES:
    """A cosine-similarity index over the image features of ``pool_ds``.

    Args:
        pool_ds: dataset whose items have ``image`` (a processed (C, H, W) tensor) and ids; it must
            have ``sample_ids()`` (the dataset contract), which keys the cache.
        feature_fn: batch of images (B, C, H, W) -> features (B, D); e.g. the model's CLIP encoder.
            It is called under ``torch.no_grad`` and may move the batch to its own device.
        cache_path: file for the pool features (None = no cache).
        batch_size: images per ``feature_fn`` call.
        feature_name: identifies ``feature_fn`` in the cache key (default: its qualified name); name
            the encoder and its weights so that a cache from another model is not reused.
        num_workers: DataLoader workers that load the images.
    """

    def __init__(
        self,
        pool_ds,
        feature_fn: FeatureFn,
        cache_path: str | os.PathLike | None = None,
        batch_size: int = 64,
        feature_name: str | None = None,
        num_workers: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"RICES batch_size must be positive, got {batch_size}")
        self.pool_ds = pool_ds
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.feature_name = feature_name or getattr(feature_fn, "__qualname__", type(feature_fn).__qualname__)
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.computed = False  # True when the features were computed rather than read from the cache
        self._last_query: tuple | None = None
        self.features, self.pool_ids = self._load_or_compute()

    def __len__(self) -> int:
        return self.features.shape[0]

    def cache_key(self) -> str:
        """Hash of what the pool features depend on: pool ids, pool size and feature function."""
        content = {
            "format": CACHE_FORMAT,
            "feature": self.feature_name,
            "num_items": len(self.pool_ds),
            "sample_ids": [str(i) for i in self.pool_ds.sample_ids()],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def _load_or_compute(self) -> tuple[torch.Tensor, list[tuple]]:
        key = self.cache_key() if self.cache_path is not None else None
        if self.cache_path is not None and self.cache_path.exists():
            try:
                cached = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            except Exception as err:  # any unreadable file gets the same advice
                raise DataError(
                    f"{self.cache_path}: not a readable RICES feature cache ({err}); "
                    "delete it or pick another cache path"
                ) from None
            if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
                raise DataError(f"{self.cache_path}: not a RICES feature cache; delete it or pick another cache path")
            if cached["key"] == key:
                return cached["features"], [tuple(ids) for ids in cached["pool_ids"]]
            logger.info("RICES cache %s is for another pool or feature function; recomputing", self.cache_path)
        features, pool_ids = self._compute_features(self.pool_ds)
        self.computed = True
        if self.cache_path is not None:
            cache = {
                "format": CACHE_FORMAT,
                "key": key,
                "feature_name": self.feature_name,
                "features": features,
                "pool_ids": [list(ids) for ids in pool_ids],
            }
            with atomic_writer(self.cache_path) as handle:
                torch.save(cache, handle)
        return features, pool_ids

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 CPU features of a batch of images (B, C, H, W)."""
        with torch.no_grad():
            features = self.feature_fn(images)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f"feature_fn must return (B, D) features, got shape {tuple(features.shape)}")
        return F.normalize(features.detach().float().cpu(), dim=-1)

    def dataset_features(self, dataset) -> tuple[torch.Tensor, list[tuple]]:
        """Normalised features (N, D) of every image of ``dataset`` and each item's ids.

        The result for the last dataset object is kept: a few-shot sweep builds one
        FewShotDataset per (shots, trial) over the same queries and needs their features once.
        """
        if self._last_query is not None and self._last_query[0] is dataset:
            return self._last_query[1]
        result = self._compute_features(dataset)
        self._last_query = (dataset, result)
        return result

    def _compute_features(self, dataset) -> tuple[torch.Tensor, list[tuple]]:
        loader = DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=_collate_images
        )
        chunks, ids = [], []
        for images, batch_ids in loader:
            chunks.append(self.encode(images))
            ids += batch_ids
        if not chunks:
            raise DataError("RICES: the dataset is empty")
        return torch.cat(chunks), ids

    def similarities(self, query_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (B, N) of normalised query features to every pool item."""
        return query_features.to(self.features.dtype) @ self.features.T

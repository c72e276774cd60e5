"""COCO Caption: Karpathy splits for training and split membership, official captions_*.json for scoring.

Files (``build_info``):
- ``karpathy_file``: ``dataset_coco.json`` -- ``{"images": [{"filepath", "filename", "cocoid", "split",
  "sentences": [{"raw", ...}]}]}`` with split in train / restval / val / test.
- ``images``: the folder holding ``<filepath>/<filename>`` (e.g. ``train2014/COCO_train2014_...jpg``).
- ``annotations``: ``{split: captions_*.json}``, the official ground truth of each eval split
  (``{"images": [{"id", ...}], "annotations": [{"image_id", "caption", ...}]}``); for the Karpathy
  val and test splits both point at ``captions_val2014.json``.

Training: one sample per (image, caption); ``train`` also takes the ``restval`` images
when ``train_includes_restval`` (the usual 113k-image Karpathy train). Evaluation:
one sample per image with its Karpathy sentences as ``captions``. A split with a
ground-truth file is checked against it (every image must appear there with at least
one caption) and scored with it; an eval-role split without one (e.g. Karpathy train
as a few-shot demo pool, which includes val2014 restval images absent from
captions_train2014.json) gets ``annotation_file = None``: it can serve demonstrations
but cannot be scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lavis.common.errors import ConfigError, DataError
from lavis.common.fileio import read_json
from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    BaseBuilder,
    BuilderConfig,
    path_or_error,
    require,
    require_list,
)
from lavis.datasets.samples import CAPTION_EVAL, CAPTION_TRAIN

logger = logging.getLogger(__name__)


@dataclass
class CaptionBuildInfo:
    images: Optional[str] = None  # folder holding the Karpathy file's <filepath>/<filename> images
    karpathy_file: Optional[str] = None  # dataset_coco.json: split membership and the training captions
    # {split: official captions_*.json} scoring that eval split (Karpathy val, test: captions_val2014.json);
    # an eval split without one (a few-shot demo pool) is built from the Karpathy sentences and not scored.
    annotations: dict[str, str] = field(default_factory=dict)
    shards: dict[str, str] = field(default_factory=dict)  # split -> shard pattern (data_type: webdataset)


def _caption_text_defaults() -> dict[str, dict[str, Any]]:
    return {"train": {"name": "caption_text"}, "eval": {"name": "caption_text"}}


@dataclass
class CaptionConfig(BuilderConfig):
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])  # Karpathy splits to build
    # Text processor per role: {train: {name, ...}, eval: {name, ...}} (default caption_text for both).
    text_processor: dict[str, dict[str, Any]] = field(default_factory=_caption_text_defaults)
    # Split train also takes the Karpathy restval images (the usual 113k-image training set).
    train_includes_restval: bool = True
    # The data files (shapes_caption: derived from shapes.root, any value given is replaced).
    build_info: CaptionBuildInfo = field(default_factory=CaptionBuildInfo)


def karpathy_splits(split: str, include_restval: bool) -> tuple[str, ...]:
    """The Karpathy split names that make up one of our splits."""
    if split == "train" and include_restval:
        return ("train", "restval")
    return (split,)


def read_ground_truth(path: str) -> dict[int, int]:
    """``{image_id: number of captions}`` of an official captions_*.json, checked field by field."""
    doc = read_json(path, "caption ground-truth file")
    images = require_list(doc, "images", path)
    annotations = require_list(doc, "annotations", path)
    counts: dict[int, int] = {}
    for i, image in enumerate(images):
        counts[require(image, ("id",), path, f"images[{i}]")["id"]] = 0
    for i, ann in enumerate(annotations):
        require(ann, ("image_id", "caption"), path, f"annotations[{i}]")
        if ann["image_id"] not in counts:
            raise DataError(f"{path}: annotations[{i}] has image_id {ann['image_id']} that is not in its 'images'")
        counts[ann["image_id"]] += 1
    return counts


@registry.register_builder("coco_caption")
class CocoCaptionBuilder(BaseBuilder):
    """COCO captions in the Karpathy split (see the module docstring for the files)."""

    name = "coco_caption"
    Config = CaptionConfig

    def _karpathy_images(self, split: str) -> tuple[str, list[dict]]:
        info = self.cfg.build_info
        path = path_or_error(info.karpathy_file, f"{self.key_path}.build_info.karpathy_file")
        images = require_list(self._load_karpathy(path), "images", path)
        wanted = karpathy_splits(split, self.cfg.train_includes_restval)
        known = {"train", "restval", "val", "test"}
        if split not in known - {"restval"}:
            raise ConfigError(f"{self.key_path}.splits: unknown split {split!r}; Karpathy splits are train, val, test")
        chosen = []
        for i, image in enumerate(images):
            where = f"images[{i}]" + (
                f" (cocoid {image['cocoid']})" if isinstance(image, dict) and "cocoid" in image else ""
            )
            require(image, ("filepath", "filename", "cocoid", "split", "sentences"), path, where)
            if image["split"] not in known:
                raise DataError(f"{path}: {where} has split {image['split']!r}, not one of {sorted(known)}")
            if image["split"] in wanted:
                chosen.append(image)
        return path, chosen

    def _load_karpathy(self, path: str):
        """The parsed Karpathy split file (a subclass may adapt another data set's records here)."""
        return read_json(path, "Karpathy split file")

    def _image_path(self, image: dict) -> str:
        root = path_or_error(self.cfg.build_info.images, f"{self.key_path}.build_info.images")
        return str(Path(root) / image["filepath"] / image["filename"])

    def ground_truth_file(self, split: str) -> Optional[str]:
        """The official-format captions file that scores ``split``, or None when none is configured.

        Only a scored split needs one; a split used as a few-shot demo pool takes its reference captions
        from the Karpathy sentences. Scoring such a split is refused before any generation
        (``lavis.runners.fewshot_eval``).
        """
        path = self.cfg.build_info.annotations.get(split)
        if not path:
            logger.info(
                "%s/%s: no build_info.annotations.%s, so the split can serve few-shot demonstrations "
                "(Karpathy captions) but cannot be scored",
                self.name,
                split,
                split,
            )
            return None
        return str(path)

    def read_records(self, split, role):
        """Records of one split; see the module docstring."""
        karpathy, images = self._karpathy_images(split)
        if not images:
            raise DataError(f"{karpathy}: the Karpathy split {split!r} is empty")
        if role == "train":
            records = []
            for image in images:
                for j, sentence in enumerate(image["sentences"]):
                    where = f"image cocoid {image['cocoid']} sentences[{j}]"
                    require(sentence, ("raw",), karpathy, where)
                    records.append(
                        {"image_path": self._image_path(image), "image_id": image["cocoid"], "caption": sentence["raw"]}
                    )
            return records, CAPTION_TRAIN, {"annotation_file": None}
        gt_file = self.ground_truth_file(split)
        counts = read_ground_truth(gt_file) if gt_file else None
        records = []
        for image in images:
            if counts is not None and counts.get(image["cocoid"], 0) == 0:
                raise DataError(
                    f"{karpathy}: image cocoid {image['cocoid']} of split {split!r} has no caption in the "
                    f"ground-truth file {gt_file}"
                )
            captions = [
                require(s, ("raw",), karpathy, f"image cocoid {image['cocoid']} sentences")["raw"]
                for s in image["sentences"]
            ]
            if counts is None and not captions:
                # Without a ground-truth file the Karpathy sentences are the only references a demo can show.
                raise DataError(f"{karpathy}: image cocoid {image['cocoid']} of split {split!r} has no sentences")
            records.append({"image_path": self._image_path(image), "image_id": image["cocoid"], "captions": captions})
        return records, CAPTION_EVAL, {"annotation_file": gt_file}

    def shard_key(self, split):
        return f"build_info.shards.{split}"

    def shard_info(self, split, role):
        """Shard pattern, sample format and scoring file of a split stored as shards."""
        shards = self.cfg.build_info.shards
        if split not in shards:
            raise ConfigError(f"{self.key_path}.{self.shard_key(split)}: no shard pattern for split {split!r}")
        if role == "train":
            return str(shards[split]), CAPTION_TRAIN, {"annotation_file": None}
        gt_file = self.ground_truth_file(split)
        if gt_file:
            read_ground_truth(gt_file)  # checked up front, like the image path
        return str(shards[split]), CAPTION_EVAL, {"annotation_file": gt_file}

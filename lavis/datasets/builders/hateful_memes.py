"""Hateful Memes: JSON-lines annotation files ``{"id", "img", "label", "text"}``, one per split.

``build_info``: ``images`` (the folder holding each line's ``img``, e.g. ``img/01235.png``) and
``annotations: {split: file}`` (``train.jsonl``/``dev.jsonl``; OpenFlamingo evaluates ``dev``).
Labels are 0 (not hateful, class "no") and 1 (hateful, class "yes"); ``text`` is the meme's OCR text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lavis.common.errors import ConfigError, DataError
from lavis.common.fileio import read_json_lines
from lavis.common.registry import registry
from lavis.datasets.builders.base import BaseBuilder, BuilderConfig, path_or_error, require
from lavis.datasets.classification import CLASSIFICATION

CLASS_NAMES = ("no", "yes")


@dataclass
class HatefulMemesBuildInfo:
    images: Optional[str] = None  # folder holding each annotation line's img (e.g. img/01235.png)
    annotations: dict[str, str] = field(default_factory=dict)  # {split: JSON-lines file}


def _text_defaults() -> dict[str, dict[str, Any]]:
    return {"train": {"name": "caption_text", "max_words": None}, "eval": {"name": "caption_text", "max_words": None}}


@dataclass
class HatefulMemesConfig(BuilderConfig):
    splits: list[str] = field(default_factory=lambda: ["train", "dev"])  # the splits to build
    # Text processor of the OCR text per role: {train: {name, ...}, eval: {name, ...}}.
    text_processor: dict[str, dict[str, Any]] = field(default_factory=_text_defaults)
    # The data files (shapes_hateful_memes: derived from shapes_suite.root).
    build_info: HatefulMemesBuildInfo = field(default_factory=HatefulMemesBuildInfo)


@registry.register_builder("hateful_memes")
class HatefulMemesBuilder(BaseBuilder):
    """Hateful Memes memes with their OCR text and label (see the module docstring)."""

    name = "hateful_memes"
    Config = HatefulMemesConfig
    classification_kind = "hateful_memes"  # the prompt and metric of the classification task

    def class_names(self) -> list[str]:
        """The classes in label order: "no" (0), "yes" (1)."""
        return list(CLASS_NAMES)

    def read_records(self, split, role):
        """One record per meme."""
        info = self.cfg.build_info
        if split not in info.annotations:
            raise ConfigError(f"{self.key_path}.build_info.annotations.{split}: no annotation file for split {split!r}")
        path = str(info.annotations[split])
        images = path_or_error(info.images, f"{self.key_path}.build_info.images")
        records, seen = [], set()
        for i, rec in enumerate((v for _, v in read_json_lines(path, "Hateful Memes annotation file"))):
            where = f"line {i + 1}"
            require(rec, ("id", "img", "label", "text"), path, where)
            if rec["label"] not in (0, 1) or isinstance(rec["label"], bool):
                raise DataError(f"{path}: {where} (id {rec['id']}) has label {rec['label']!r}; expected 0 or 1")
            if not isinstance(rec["text"], str):
                raise DataError(f"{path}: {where} (id {rec['id']}) has a non-string text")
            sample_id = int(rec["id"])
            if sample_id in seen:
                raise DataError(f"{path}: {where} repeats id {rec['id']}")
            seen.add(sample_id)
            records.append(
                {
                    "image_path": str(Path(images) / rec["img"]),
                    "image_id": sample_id,
                    "id": sample_id,
                    "label": rec["label"],
                    "class_name": CLASS_NAMES[rec["label"]],
                    "text": rec["text"],
                    "class_set": self.name,
                }
            )
        return records, CLASSIFICATION, {"annotation_file": path}

"""Flickr30k, Karpathy split: ``dataset_flickr30k.json`` + a COCO-style ground-truth file for scoring.

Files (``build_info``, the COCO Caption keys):
- ``karpathy_file``: ``dataset_flickr30k.json`` -- ``{"images": [{"filename", "imgid", "split",
  "sentences": [{"raw", ...}]}]}``, split in train / val / test (no restval).
- ``images``: the folder holding the ``filename`` images (``flickr30k-images/``).
- ``annotations``: ``{split: dataset_flickr30k_coco_style.json}`` (COCO captions format, ``images[].id`` =
  the image id), the file OpenFlamingo scores the ``test`` split with.

The image id is the file name's stem (``1000092795.jpg`` -> 1000092795), as in OpenFlamingo and its
COCO-style file. Everything else is COCO Caption's reader (lavis/datasets/builders/coco_caption.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath

from lavis.common.errors import DataError
from lavis.common.registry import registry
from lavis.datasets.builders.base import require, require_list
from lavis.datasets.builders.coco_caption import CaptionConfig, CocoCaptionBuilder


@dataclass
class Flickr30kConfig(CaptionConfig):
    splits: list[str] = field(default_factory=lambda: ["train", "test"])  # Karpathy splits to build
    train_includes_restval: bool = False  # Flickr30k's Karpathy file has no restval split


def image_id_of(filename: str, path: str, where: str) -> int:
    """The image id of a Flickr30k file name (its numeric stem)."""
    stem = PurePath(str(filename)).stem
    if not stem.isdigit():
        raise DataError(f"{path}: {where} has filename {filename!r}, whose stem is not a numeric image id")
    return int(stem)


@registry.register_builder("flickr30k")
class Flickr30kBuilder(CocoCaptionBuilder):
    """Flickr30k captions in the Karpathy split (see the module docstring)."""

    name = "flickr30k"
    Config = Flickr30kConfig

    def _load_karpathy(self, path: str) -> dict:
        """The Karpathy file with each image given COCO's ``cocoid`` (its id) and an empty ``filepath``."""
        doc = super()._load_karpathy(path)
        for i, image in enumerate(require_list(doc, "images", path)):
            require(image, ("filename", "split", "sentences"), path, f"images[{i}]")
            image.setdefault("filepath", "")
            image["cocoid"] = image_id_of(image["filename"], path, f"images[{i}]")
        return doc

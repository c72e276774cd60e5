"""ImageNet as torchvision's ``ImageFolder``: ``<root>/<split>/<class folder>/<image>``.

Class folders sorted by name give the class indices (torchvision's rule; the 1000 ILSVRC synset folders
``n01440764`` ... then follow the order of the class names). ``classnames`` names the classes in that order:
null means the 1000 ImageNet class names OpenFlamingo uses (open_clip's list); a stand-in with other
classes gives its own list (or ``classnames_file``, a JSON list). Image files are those with an image
extension (torchvision's ``IMG_EXTENSIONS``). Sample ids are the positions in the sorted file list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lavis.common.errors import ConfigError, DataError
from lavis.common.fileio import read_json
from lavis.common.registry import registry
from lavis.datasets.builders.base import BaseBuilder, BuilderConfig, path_or_error
from lavis.datasets.classification import CLASSIFICATION

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageNetConfig(BuilderConfig):
    root: Optional[str] = None  # folder holding one ImageFolder per split (train/, val/)
    # Class names in class-folder order; null = the 1000 ImageNet names (or classnames_file).
    classnames: Optional[list[str]] = None
    classnames_file: Optional[str] = None  # JSON list of class names, used when classnames is null
    # Prompts show no text for ImageNet; the text processor is unused but kept for the shared schema.
    text_processor: dict = field(
        default_factory=lambda: {"train": {"name": "caption_text"}, "eval": {"name": "caption_text"}}
    )


@registry.register_builder("imagenet")
class ImageNetBuilder(BaseBuilder):
    """ImageNet-style image folders (see the module docstring)."""

    name = "imagenet"
    Config = ImageNetConfig
    classification_kind = "imagenet"  # the prompt and metric of the classification task

    def class_names(self) -> list[str]:
        """The class names in class-index order."""
        if self.cfg.classnames:
            return [str(n) for n in self.cfg.classnames]
        if self.cfg.classnames_file:
            names = read_json(self.cfg.classnames_file, "class names file")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{self.cfg.classnames_file}: expected a JSON list of class names")
            return names
        from lavis.metrics.classification import imagenet_classnames

        return imagenet_classnames()

    def read_records(self, split, role):
        """One record per image file, labelled by its class folder."""
        root = Path(path_or_error(self.cfg.root, f"{self.key_path}.root")) / split
        if not root.is_dir():
            raise DataError(f"{self.key_path}: the ImageFolder of split {split!r} is not a folder: {root}")
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
        names = self.class_names()
        if len(folders) != len(names):
            raise DataError(
                f"{root}: {len(folders)} class folders but {len(names)} class names "
                f"({self.key_path}.classnames); they must correspond one to one in sorted folder order"
            )
        records = []
        for label, folder in enumerate(folders):
            files = sorted(f for f in os.listdir(root / folder) if f.lower().endswith(IMG_EXTENSIONS))
            for filename in files:
                records.append(
                    {
                        "image_path": str(root / folder / filename),
                        "label": label,
                        "class_name": names[label],
                        "text": "",
                        "class_set": self.name,
                    }
                )
        for i, rec in enumerate(records):
            rec["id"] = rec["image_id"] = i
        if not records:
            raise DataError(f"{root}: no image files in its class folders")
        return records, CLASSIFICATION, {"annotation_file": None}

    def shard_info(self, split, role):
        raise ConfigError(f"{self.key_path}.data_type: imagenet reads image folders only")

"""What every dataset builder shares: the config schema, checked JSON records, splits and roles.

``Builder(cfg).build_datasets()`` -> ``{split: Dataset}``. A builder subclass
reads its annotation files into records (``read_records``), checking up front
everything that can be checked before training (files exist, JSON parses,
fields present, ids join, image files exist); the base class attaches the
processors of the split's role and wraps the records in a dataset (image files,
or webdataset shards when ``data_type: webdataset``).

A split whose name is in ``train_splits`` gets the train role (train
processors, one sample per caption); every other split gets the eval role.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lavis.common.errors import ConfigError, DataError
from lavis.common.schema import Validated, config_instance
from lavis.datasets.processors import build_processor, processor_problems
from lavis.datasets.samples import ImageDataset, SampleFormat

logger = logging.getLogger(__name__)


def _vis_defaults() -> dict[str, dict[str, Any]]:
    return {
        "train": {"name": "clip_image_train", "image_size": 224},
        "eval": {"name": "clip_image_eval", "image_size": 224},
    }


@dataclass
class ShardOptions:
    """Streaming options used when ``data_type: webdataset``."""

    shuffle: bool = True  # shard order and a buffer, train role only; eval is read in order
    # Train role: records held per DataLoader worker and yielded in random order (<= 1: shard order only).
    shuffle_buffer: int = 1000
    seed: int = 0  # seeds each epoch's shard order and the buffer draws (combined with the epoch)
    # ranks get ceil(N / world) samples by repeating up to world-1 samples (logged), or exactly their share.
    uneven: Literal["pad", "exact"] = "pad"


@dataclass
class BuilderConfig(Validated):
    """Keys shared by every builder's section (``datasets.<builder>``)."""

    # images: image files on disk; webdataset: tar shards named in build_info.shards (python -m
    # lavis.datasets.pack_shards writes them); a train split read from shards needs no other file.
    data_type: Literal["images", "webdataset"] = "images"
    splits: list[str] = field(default_factory=lambda: ["train", "val"])  # the splits to build
    # Splits given the train role (train processors, one sample per caption); the others get the eval role.
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    # Image transform per role: {train: {name: clip_image_train, image_size, ...}, eval: {name: ...}}.
    vis_processor: dict[str, dict[str, Any]] = field(default_factory=_vis_defaults)
    # Text processor per role: {train: {name, ...}, eval: {name, ...}} (caption_text or question_text).
    text_processor: dict[str, dict[str, Any]] = field(default_factory=dict)
    # An unreadable sample: error = stop with a DataError; skip = log it, serve the next one, count it.
    on_bad_sample: Literal["error", "skip"] = "error"
    max_samples: Optional[int] = None  # cap per split (the first N in file order), for demos and tests
    check_images: bool = True  # stat every image file when the dataset is built
    # Streaming options, used only with data_type: webdataset.
    webdataset: ShardOptions = field(default_factory=ShardOptions)

    def validate(self, path: str) -> list[str]:
        # Each role's processor is checked against its own Config here, at load time, with the other errors.
        tables = {"vis_processor": self.vis_processor, "text_processor": self.text_processor}
        return [
            problem
            for kind, table in tables.items()
            for role, spec in table.items()
            for problem in processor_problems(spec, f"{path}.{kind}.{role}")
        ]


def require(record, fields: tuple[str, ...], path, where: str):
    """Check that a JSON record is a mapping holding ``fields``; DataError naming file and record otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where} is not a JSON object: {str(record)[:80]}")
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(f"{path}: {where} lacks field(s) {', '.join(missing)}")
    return record


def require_list(document, key: str, path) -> list:
    """``document[key]`` as a list, or a DataError naming the file and the key."""
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise DataError(f"{path}: expected a top-level object with a list {key!r}")
    return document[key]


class BaseBuilder:
    """Builds ``{split: Dataset}`` from a validated section; subclasses read the files."""

    name = "base"
    Config = BuilderConfig
    #: A classification data set names the prompt and metric of the classification task ("imagenet",
    #: "hateful_memes") and implements ``class_names()``; None for every other builder.
    classification_kind: str | None = None
    #: The key that ``prepare()`` derives ``build_info`` from (e.g. "shapes.root"); None: the user's build_info.
    build_info_derived_from: str | None = None

    def __init__(self, cfg=None):
        self.key_path = f"datasets.{self.name}"
        #: The section as its typed ``Config`` instance (the loader's, or checked here when built in code).
        self.cfg = config_instance(self.Config, cfg or {}, self.key_path)

    # --- for subclasses -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Make the files ``read_records`` reads available (a synthetic set generates itself and points its
        build_info at them). Called before reading; must be idempotent. The default does nothing."""

    def derive(self, **values) -> None:
        """Replace keys of the section by values derived in ``prepare()``, checked like the user's."""
        self.cfg = config_instance(self.Config, {**dataclasses.asdict(self.cfg), **values}, self.key_path)

    def shard_key(self, split: str) -> str:
        """The key, under the section, that names the shard pattern of ``split`` (data_type: webdataset)."""
        raise NotImplementedError(f"{self.key_path}: this data set is not read from shards")

    def class_names(self) -> list[str]:
        """The class names in label order (classification data sets, see ``classification_kind``)."""
        raise NotImplementedError(f"{self.key_path}: not a classification data set")

    def read_records(self, split: str, role: str) -> tuple[list[dict], SampleFormat, dict]:
        """(records, sample format, {"annotation_file": ..., "question_file": ...}) of an image split."""
        raise NotImplementedError

    def shard_info(self, split: str, role: str) -> tuple[str, SampleFormat, dict]:
        """(shard pattern, sample format, scoring files) of a split stored as webdataset shards."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def role(self, split: str) -> str:
        """``train`` or ``eval``."""
        return "train" if split in self.cfg.train_splits else "eval"

    def processors(self, role: str):
        """(image processor, text processor) configured for ``role``."""
        vis, text = self.cfg.vis_processor, self.cfg.text_processor
        for kind, table in (("vis_processor", vis), ("text_processor", text)):
            if role not in table:
                raise ConfigError(f"{self.key_path}.{kind}.{role}: no processor configured for the {role} role")
        return (
            build_processor(vis[role], f"{self.key_path}.vis_processor.{role}"),
            build_processor(text[role], f"{self.key_path}.text_processor.{role}"),
        )

    def capped(self, records: list, split: str) -> list:
        """At most ``max_samples`` records (the first ones), logged so a demo never looks like a full run."""
        cap = self.cfg.max_samples
        if cap is not None and len(records) > cap:
            logger.info("%s/%s: using the first %d of %d samples (max_samples)", self.name, split, cap, len(records))
            return records[:cap]
        return records

    def build_split(self, split: str):
        """The dataset of one split."""
        role = self.role(split)
        vis, text = self.processors(role)
        if self.cfg.data_type == "webdataset":
            from lavis.datasets.builders.webdataset import build_shard_dataset

            return build_shard_dataset(self, split, role, vis, text)
        records, sample_format, files = self.read_records(split, role)
        records = self.capped(records, split)
        if not records:
            raise DataError(f"{self.name}/{split}: the split is empty ({files or 'no files'})")
        if self.cfg.check_images:
            check_image_files(records, f"{self.name}/{split}")
        return ImageDataset(
            records,
            sample_format,
            vis,
            text,
            on_bad_sample=self.cfg.on_bad_sample,
            name=f"{self.name}/{split}",
            **files,
        )

    def build_datasets(self) -> dict:
        """``{split: Dataset}`` for every split in ``splits``."""
        if not self.cfg.splits:
            raise ConfigError(f"{self.key_path}.splits: no split to build")
        self.prepare()
        return {split: self.build_split(split) for split in self.cfg.splits}


def check_image_files(records: list[dict], where: str) -> None:
    """Every record's image file exists; one DataError listing the first few that do not."""
    missing, seen = [], set()
    for record in records:
        path = record["image_path"]
        if path in seen:
            continue
        seen.add(path)
        if not os.path.isfile(path):
            missing.append(f"{path} (image_id={record['image_id']})")
    if missing:
        shown = "\n  - ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{where}: {len(missing)} image file(s) not found in the image folder:\n  - {shown}{more}")


def path_or_error(value, key_path: str) -> str:
    """A configured path that must be set; ConfigError naming the key otherwise."""
    if not value:
        raise ConfigError(f"{key_path}: must be set (a path)")
    return str(value)

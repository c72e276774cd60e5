"""Builders of the suite's synthetic stand-ins: generate on first use, then read with the real readers.

``shapes_<name>`` is builder ``<name>`` (flickr30k, okvqa, textvqa, vizwiz, hateful_memes, imagenet) with its
files derived from ``suite.root`` (lavis.datasets.synthetic_suite writes them there, in each data set's own
format). Generation is serialised by a file lock and published by one rename, as for the shapes set; an
existing root generated with other settings is an error, never overwritten.
"""

from __future__ import annotations

import fcntl
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lavis.common.errors import ConfigError, DataError
from lavis.common.registry import registry
from lavis.datasets import synthetic_suite
from lavis.datasets.builders.flickr30k import Flickr30kBuilder, Flickr30kConfig
from lavis.datasets.builders.hateful_memes import HatefulMemesBuilder, HatefulMemesConfig
from lavis.datasets.builders.imagenet import ImageNetBuilder, ImageNetConfig
from lavis.datasets.builders.okvqa import OKVQABuilder
from lavis.datasets.builders.textvqa import TextVQABuilder
from lavis.datasets.builders.vizwiz import VizWizBuilder
from lavis.datasets.builders.vqav2 import VQAConfig

logger = logging.getLogger(__name__)


@dataclass
class SuiteOptions:
    root: str = "data/shapes_suite"  # folder of the stand-ins, generated there if absent
    num_images: int = 200  # scenes over both splits (each data set uses all of them, ImageNet single shapes)
    seed: int = 0  # generation seed: scene i depends only on (seed, i)
    image_size: int = 64  # side of the generated square images, in pixels
    val_fraction: float = 0.2  # share of the scenes in the evaluated split (val; Hateful Memes dev, Flickr test)


def ensure_suite(opts) -> Path:
    """The folder of the stand-ins described by ``opts``, generated there if absent."""
    root = Path(opts.root)
    wanted = {
        "version": synthetic_suite.VERSION,
        "seed": opts.seed,
        "num_images": opts.num_images,
        "image_size": opts.image_size,
        "val_fraction": float(opts.val_fraction),
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root.exists():
            logger.info("generating the suite stand-ins into %s (%d scenes, seed %d)", root, opts.num_images, opts.seed)
            try:
                synthetic_suite.write_suite(root, opts.num_images, opts.seed, opts.image_size, wanted["val_fraction"])
            except ValueError as err:
                raise ConfigError(f"suite: {err}") from None
    manifest_path = root / "suite.json"
    if not manifest_path.is_file():
        raise DataError(f"{root} exists but holds no suite.json: not generated stand-ins; choose another root")
    manifest = json.loads(manifest_path.read_text())
    found = {k: manifest.get(k) for k in wanted}
    if found != wanted:
        raise ConfigError(
            f"suite.root {root} holds stand-ins generated with {found}, but the config asks for "
            f"{wanted}; use another root or delete the folder"
        )
    return root


def _vqa_info(name: str):
    def make(root: Path) -> dict:
        base = root / name
        if name == "okvqa":
            return {
                s: {
                    "questions": str(base / f"OpenEnded_mscoco_{s}2014_questions.json"),
                    "annotations": str(base / f"mscoco_{s}2014_annotations.json"),
                    "images": str(base / "images" / f"{s}2014"),
                    "image_name_format": "COCO_{data_subtype}_{image_id:012d}.png",
                    "shards": None,
                }
                for s in synthetic_suite.SPLITS
            }
        images = {"textvqa": lambda s: base / "train_images", "vizwiz": lambda s: base / s}[name]
        return {
            s: {
                "questions": str(base / f"{s}_questions_vqa_format.json"),
                "annotations": str(base / f"{s}_annotations_vqa_format.json"),
                "images": str(images(s)),
                "image_name_format": "{image_id}.png" if name == "textvqa" else "{image_id}",
                "shards": None,
            }
            for s in synthetic_suite.SPLITS
        }

    return make


def _flickr_info(root: Path) -> dict:
    base = root / "flickr30k"
    return {
        "images": str(base / "flickr30k-images"),
        "karpathy_file": str(base / "dataset_flickr30k.json"),
        "annotations": {"test": str(base / "dataset_flickr30k_coco_style.json")},
        "shards": {},
    }


def _hateful_memes_info(root: Path) -> dict:
    base = root / "hateful_memes"
    return {"images": str(base), "annotations": {"train": str(base / "train.jsonl"), "dev": str(base / "dev.jsonl")}}


class _GenerateSuiteFirst:
    """Mixin: generate the stand-ins, then point the builder's files at them before the real reader runs."""

    build_info_derived_from = "suite.root"

    def prepare(self) -> None:
        """Generate the stand-in (once, under a lock) and point the builder's files at it."""
        if self.cfg.data_type != "images":
            raise ConfigError(f"{self.key_path}.data_type: the suite stand-ins read images only")
        self.point_at(ensure_suite(self.cfg.suite))

    def point_at(self, root: Path) -> None:
        self.derive(build_info=self.info_factory(root))


@dataclass
class ShapesFlickr30kConfig(Flickr30kConfig):
    # The stand-ins, generated into suite.root on first use; build_info is derived from it.
    suite: SuiteOptions = field(default_factory=SuiteOptions)


@dataclass
class ShapesVQASuiteConfig(VQAConfig):
    # The stand-ins, generated into suite.root on first use; build_info is derived from it.
    suite: SuiteOptions = field(default_factory=SuiteOptions)


@dataclass
class ShapesHatefulMemesConfig(HatefulMemesConfig):
    # The stand-ins, generated into suite.root on first use; build_info is derived from it.
    suite: SuiteOptions = field(default_factory=SuiteOptions)


@dataclass
class ShapesImageNetConfig(ImageNetConfig):
    # The stand-ins, generated into suite.root on first use; root and classnames are derived from it.
    suite: SuiteOptions = field(default_factory=SuiteOptions)


def _register(name: str, base, config_cls, info_factory, **attrs):
    cls = type(
        f"Shapes{base.__name__}",
        (_GenerateSuiteFirst, base),
        {
            "name": f"shapes_{name}",
            "Config": config_cls,
            "info_factory": staticmethod(info_factory),
            "__doc__": f"The synthetic stand-in of {name}, in its official format.",
            **attrs,
        },
    )
    registry.register_builder(f"shapes_{name}")(cls)
    return cls


ShapesFlickr30kBuilder = _register("flickr30k", Flickr30kBuilder, ShapesFlickr30kConfig, _flickr_info)
ShapesOKVQABuilder = _register("okvqa", OKVQABuilder, ShapesVQASuiteConfig, _vqa_info("okvqa"))
ShapesTextVQABuilder = _register("textvqa", TextVQABuilder, ShapesVQASuiteConfig, _vqa_info("textvqa"))
ShapesVizWizBuilder = _register("vizwiz", VizWizBuilder, ShapesVQASuiteConfig, _vqa_info("vizwiz"))
ShapesHatefulMemesBuilder = _register(
    "hateful_memes", HatefulMemesBuilder, ShapesHatefulMemesConfig, _hateful_memes_info
)


def _imagenet_point_at(self, root: Path) -> None:
    self.derive(root=str(root / "imagenet"), classnames=list(synthetic_suite.IMAGENET_CLASSES))


ShapesImageNetBuilder = _register("imagenet", ImageNetBuilder, ShapesImageNetConfig, None, point_at=_imagenet_point_at)

"""Builders of the synthetic shapes set: generate on first use, then read with the real readers.

``shapes_caption`` is ``coco_caption`` and ``shapes_vqa`` is ``vqav2`` with their
``build_info`` derived from ``root``. When ``root`` does not hold the set yet it is
generated there (lavis.datasets.synthetic_shapes). Under DDP every rank builds its
datasets: a file lock serialises them and the generator renames a finished
temporary folder into place, so no rank ever reads a half-written set. An
existing ``root`` generated with other settings is an error, never overwritten.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lavis.common.errors import ConfigError, DataError
from lavis.common.registry import registry
from lavis.datasets import synthetic_shapes
from lavis.datasets.builders.coco_caption import CaptionConfig, CocoCaptionBuilder
from lavis.datasets.builders.vqav2 import VQAConfig, VQAv2Builder

logger = logging.getLogger(__name__)


@dataclass
class ShapesOptions:
    root: str = "data/shapes"  # folder of the set, generated there if absent (a set made otherwise: error)
    num_images: int = 1000  # images over all splits (each with 5 captions and 5 questions)
    seed: int = 0  # generation seed: image i depends only on (seed, i)
    image_size: int = 64  # side of the generated square images, in pixels
    # Train, val and test shares of the images, in id order (must sum to 1).
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])


def ensure_shapes(opts) -> Path:
    """The folder of the shapes set described by ``opts``, generated there if absent."""
    root = Path(opts.root)
    wanted = {
        "version": synthetic_shapes.VERSION,
        "seed": opts.seed,
        "num_images": opts.num_images,
        "image_size": opts.image_size,
        "fractions": [float(f) for f in opts.fractions],
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not root.exists():
            logger.info("generating the shapes set into %s (%d images, seed %d)", root, opts.num_images, opts.seed)
            try:
                synthetic_shapes.write_shapes(
                    root, opts.num_images, opts.seed, opts.image_size, tuple(wanted["fractions"])
                )
            except ValueError as err:
                raise ConfigError(f"shapes: {err}") from None
    manifest_path = root / "shapes.json"
    if not manifest_path.is_file():
        raise DataError(f"{root} exists but holds no shapes.json: not a generated shapes set; choose another root")
    manifest = json.loads(manifest_path.read_text())
    found = {k: manifest.get(k) for k in wanted}
    if found != wanted:
        raise ConfigError(
            f"shapes.root {root} holds a shapes set generated with {found}, but the config asks for {wanted}; "
            "use another root or delete the folder"
        )
    return root


def caption_build_info(root: Path) -> dict:
    """``coco_caption`` build_info for a generated set."""
    ann = root / "annotations"
    return {
        "images": str(root / "images"),
        "karpathy_file": str(ann / "dataset_coco.json"),
        "annotations": {s: str(ann / f"captions_shapes_{s}.json") for s in synthetic_shapes.SPLITS},
        "shards": {},
    }


def vqa_build_info(root: Path) -> dict:
    """``vqav2`` build_info for a generated set (every split has annotations, so all can be scored)."""
    return {
        s: {
            "questions": str(root / "vqa" / f"v2_OpenEnded_mscoco_shapes_{s}_questions.json"),
            "annotations": str(root / "vqa" / f"v2_mscoco_shapes_{s}_annotations.json"),
            "images": str(root / "images" / f"shapes_{s}"),
            "image_name_format": "COCO_{data_subtype}_{image_id:012d}.png",
            "shards": None,
        }
        for s in synthetic_shapes.SPLITS
    }


@dataclass
class ShapesCaptionConfig(CaptionConfig):
    # The synthetic set, generated into shapes.root on first use; build_info is derived from it.
    shapes: ShapesOptions = field(default_factory=ShapesOptions)


@dataclass
class ShapesVQAConfig(VQAConfig):
    # The synthetic set, generated into shapes.root on first use; build_info is derived from it.
    shapes: ShapesOptions = field(default_factory=ShapesOptions)


def _with_shards(derived: dict, given: dict) -> dict:
    """``derived`` build_info with the ``shards`` entries of the user's ``given`` one (at any depth)."""
    out = dict(derived)
    for key, value in (given or {}).items():
        if key == "shards":
            out[key] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _with_shards(out[key], value)
    return out


class _GenerateFirst:
    """Mixin: generate the set, then point ``build_info`` at it before the real reader runs."""

    build_info_derived_from = "shapes.root"

    def prepare(self) -> None:
        """Generate the set (once, under a lock) and derive ``build_info`` from ``shapes.root``."""
        make_info = self.info_factory
        if self.cfg.data_type == "webdataset":
            # Read from shards (python -m lavis.datasets.pack_shards): nothing is generated, so a node that
            # holds only the shards can train; the derived paths serve only to score eval-role splits.
            given = dataclasses.asdict(self.cfg)["build_info"]
            self.derive(build_info=_with_shards(make_info(Path(self.cfg.shapes.root)), given))
            return
        self.derive(build_info=make_info(ensure_shapes(self.cfg.shapes)))


@registry.register_builder("shapes_caption")
class ShapesCaptionBuilder(_GenerateFirst, CocoCaptionBuilder):
    """The shapes set as COCO captions (Karpathy train/val/test)."""

    name = "shapes_caption"
    Config = ShapesCaptionConfig
    info_factory = staticmethod(caption_build_info)


@registry.register_builder("shapes_vqa")
class ShapesVQABuilder(_GenerateFirst, VQAv2Builder):
    """The shapes set as VQAv2 questions and annotations (train/val/test all with answers)."""

    name = "shapes_vqa"
    Config = ShapesVQAConfig
    info_factory = staticmethod(vqa_build_info)

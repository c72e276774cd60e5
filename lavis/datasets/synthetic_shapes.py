"""The synthetic *shapes* data set: coloured shapes, captions and questions, in COCO and VQAv2 formats.

Small images (64x64 by default) with one or two large shapes (circle, square,
triangle) in six clear colours. One shape sits in the middle; two shapes sit
left/right or top/bottom. Each image gets five reference captions that are
paraphrases of the same content, and five questions (colour, shape, count,
position, presence), each with ten identical one-word answers. Every word comes
from a small fixed vocabulary (``VOCABULARY``) so that a tiny Flamingo with a tiny
tokenizer can learn the set on a CPU in minutes.

The set is written in exactly the real file formats, so the real readers read it::

    DIR/images/shapes_<split>/COCO_shapes_<split>_<image_id:012d>.png
    DIR/annotations/dataset_coco.json                      (Karpathy format, all splits)
    DIR/annotations/captions_shapes_<split>.json           (official COCO captions format)
    DIR/vqa/v2_OpenEnded_mscoco_shapes_<split>_questions.json
    DIR/vqa/v2_mscoco_shapes_<split>_annotations.json
    DIR/shapes.json                                        (what was generated; written last)

Image ``i`` (id ``i + 1``) depends only on ``(seed, i)``, so ids and content are
stable for a seed whatever the number of images. Splits take the first
``train``, then ``val``, then ``test`` fractions of the ids.

CLI: ``python -m lavis.datasets.synthetic_shapes --out DIR --num-images N [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lavis.common.fileio import atomic_directory

VERSION = 1
SPLITS = ("train", "val", "test")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two"}
VOCABULARY = frozenset(
    "a an the this that there is are of on in at to and with image picture photo shape shapes circle square "
    "triangle red green blue yellow purple orange one two three four 1 2 3 4 left right top bottom middle center "
    "upper lower side what which how many color colour yes no question answer short output . , ? :".split()
)
BACKGROUND = (245, 245, 245)


def article(word: str) -> str:
    """'an' before a vowel sound, 'a' otherwise."""
    return "an" if word[0] in "aeiou" else "a"


def _thing(shape: dict) -> str:
    return f"{article(shape['color'])} {shape['color']} {shape['shape']}"


def sample_scene(seed: int, index: int, size: int) -> dict:
    """The content of image ``index``: layout and shapes with colour, kind, centre and radius."""
    rng = np.random.default_rng([seed, index])
    layout = ("single", "horizontal", "vertical")[int(rng.integers(3))]
    n = 1 if layout == "single" else 2
    shapes = []
    for k in range(n):
        while True:
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            # two identical shapes would make "the red circle" ambiguous
            if not shapes or (color, kind) != (shapes[0]["color"], shapes[0]["shape"]):
                break
        jitter = rng.integers(-size // 16, size // 16 + 1, size=2)
        if layout == "single":
            centre, radius = (size / 2, size / 2), size * rng.uniform(0.25, 0.33)
            position = "center"
        else:
            lo, hi = size * 0.27, size * 0.73
            along = (lo, hi)[k]
            centre = (along, size / 2) if layout == "horizontal" else (size / 2, along)
            radius = size * rng.uniform(0.17, 0.21)
            position = {
                ("horizontal", 0): "left",
                ("horizontal", 1): "right",
                ("vertical", 0): "top",
                ("vertical", 1): "bottom",
            }[(layout, k)]
        centre = (float(centre[0] + jitter[0]), float(centre[1] + jitter[1]))
        shapes.append({"color": color, "shape": kind, "centre": centre, "radius": float(radius), "position": position})
    return {"layout": layout, "shapes": shapes}


def draw_scene(scene: dict, size: int) -> Image.Image:
    """The RGB image of a scene."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene["shapes"]:
        (x, y), r, fill = s["centre"], s["radius"], COLORS[s["color"]]
        if s["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s["shape"] == "square":
            h = r * 0.85  # the same area impression as the circle
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    return image


def captions(scene: dict) -> list[str]:
    """Five paraphrases of the scene's content."""
    shapes = scene["shapes"]
    if scene["layout"] == "single":
        t = _thing(shapes[0])
        return [
            f"{t} in the center.",
            f"an image of {t} in the center.",
            f"a picture of one shape: {t} in the middle.",
            f"there is {t} in the center of the image.",
            f"a photo of {t} in the middle of the image.",
        ]
    a, b = shapes
    pa, pb = a["position"], b["position"]
    ta, tb = _thing(a), _thing(b)
    return [
        f"{ta} on the {pa} and {tb} on the {pb}.",
        f"an image of {ta} on the {pa} and {tb} on the {pb}.",
        f"a picture of two shapes: {ta} on the {pa} and {tb} on the {pb}.",
        f"there is {ta} on the {pa} and {tb} on the {pb} of the image.",
        f"a photo of {ta} at the {pa} and {tb} at the {pb}.",
    ]


def questions(scene: dict, seed: int, index: int) -> list[tuple[str, str, str, str]]:
    """Five (question, answer, question_type, answer_type) about colour, shape, count, position, presence."""
    rng = np.random.default_rng([seed, index, 1])
    shapes = scene["shapes"]
    target = shapes[int(rng.integers(len(shapes)))]
    if scene["layout"] == "single":
        where = "in the image"
        position_q = (f"is the {target['color']} {target['shape']} in the center?", "yes")
    else:
        p = target["position"]
        where = f"on the {p}" if p in ("left", "right") else f"at the {p}"
        position_q = (f"which side is the {target['color']} {target['shape']} on?", p)
    if rng.random() < 0.5:
        probe, present = shapes[int(rng.integers(len(shapes)))], "yes"
        probe = (probe["color"], probe["shape"])
    else:
        taken = {(s["color"], s["shape"]) for s in shapes}
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in taken]
        probe, present = absent[int(rng.integers(len(absent)))], "no"
    count = str(len(shapes))
    return [
        (f"what color is the shape {where}?", target["color"], "what color is the", "other"),
        (f"what shape is {where}?", target["shape"], "what", "other"),
        ("how many shapes are there?", count, "how many", "number"),
        (position_q[0], position_q[1], "which", "yes/no" if position_q[1] == "yes" else "other"),
        (f"is there {article(probe[0])} {probe[0]} {probe[1]} in the image?", present, "is there a", "yes/no"),
    ]


def split_sizes(num_images: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """How many images each split gets (val and test at least one each when there are 3+ images)."""
    n_val = max(1, round(num_images * fractions[1])) if num_images >= 3 else 0
    n_test = max(1, round(num_images * fractions[2])) if num_images >= 3 else 0
    return {"train": num_images - n_val - n_test, "val": n_val, "test": n_test}


def _write_json(path: Path, obj) -> None:
    # A plain write: the whole folder is published at once by atomic_directory, which fsyncs every file.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def write_shapes(
    out: str | Path,
    num_images: int,
    seed: int = 0,
    image_size: int = 64,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict:
    """Generate the set into ``out`` (which must not exist) atomically; returns the manifest.

    Everything is written into a temporary sibling folder that is renamed to
    ``out`` at the end, so a reader never sees half a data set.
    """
    out = Path(out)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    # replace=False: the final rename fails if another process created ``out`` first.
    with atomic_directory(out, replace=False) as tmp:
        manifest = _generate(Path(tmp), num_images, seed, image_size, fractions)
    return manifest


def _generate(root: Path, num_images: int, seed: int, image_size: int, fractions) -> dict:
    sizes = split_sizes(num_images, fractions)
    bounds, start = {}, 0
    for split in SPLITS:
        bounds[split] = range(start, start + sizes[split])
        start += sizes[split]
    karpathy, sent_id = [], 0
    for split in SPLITS:
        subtype = f"shapes_{split}"
        coco_images, coco_anns, vqa_questions, vqa_anns = [], [], [], []
        (root / "images" / subtype).mkdir(parents=True, exist_ok=True)
        for index in bounds[split]:
            image_id = index + 1
            scene = sample_scene(seed, index, image_size)
            filename = f"COCO_{subtype}_{image_id:012d}.png"
            draw_scene(scene, image_size).save(root / "images" / subtype / filename)
            refs = captions(scene)
            sentences = []
            for caption in refs:
                sentences.append(
                    {
                        "tokens": caption.rstrip(".").replace(",", "").replace(":", "").split(),
                        "raw": caption,
                        "imgid": index,
                        "sentid": sent_id,
                    }
                )
                coco_anns.append({"image_id": image_id, "id": sent_id, "caption": caption})
                sent_id += 1
            karpathy.append(
                {
                    "filepath": subtype,
                    "filename": filename,
                    "imgid": index,
                    "split": split,
                    "sentences": sentences,
                    "cocoid": image_id,
                    "sentids": [s["sentid"] for s in sentences],
                }
            )
            coco_images.append({"id": image_id, "file_name": filename, "width": image_size, "height": image_size})
            for k, (question, answer, q_type, a_type) in enumerate(questions(scene, seed, index)):
                question_id = image_id * 10 + k
                vqa_questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                vqa_anns.append(
                    {
                        "question_type": q_type,
                        "multiple_choice_answer": answer,
                        "image_id": image_id,
                        "answer_type": a_type,
                        "question_id": question_id,
                        "answers": [
                            {"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)
                        ],
                    }
                )
        info = {"description": f"shapes synthetic set, split {split}", "version": str(VERSION), "year": 2024}
        licenses = [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
        _write_json(
            root / "annotations" / f"captions_{subtype}.json",
            {"info": info, "licenses": licenses, "type": "captions", "images": coco_images, "annotations": coco_anns},
        )
        common = {"info": info, "license": licenses[0], "data_type": "mscoco", "data_subtype": subtype}
        _write_json(
            root / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
            {**common, "task_type": "Open-Ended", "questions": vqa_questions},
        )
        _write_json(root / "vqa" / f"v2_mscoco_{subtype}_annotations.json", {**common, "annotations": vqa_anns})
    _write_json(root / "annotations" / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    manifest = {
        "generator": "lavis.datasets.synthetic_shapes",
        "version": VERSION,
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
        "fractions": list(fractions),
        "split_sizes": sizes,
    }
    _write_json(root / "shapes.json", manifest)
    return manifest


def main(argv=None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes data set (COCO + VQAv2 formats).")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.error(f"--out {args.out} already exists; choose a new folder")
    manifest = write_shapes(args.out, args.num_images, args.seed, args.image_size, tuple(args.fractions))
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

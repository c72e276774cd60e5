"""Synthetic stand-ins of OpenFlamingo's evaluation suite, in each data set's own file format.

From the shapes scenes (lavis.datasets.synthetic_shapes: same drawings, captions and questions) this writes, under
one folder::

    flickr30k/dataset_flickr30k.json, dataset_flickr30k_coco_style.json, flickr30k-images/<id>.png
    okvqa/OpenEnded_mscoco_{train,val}2014_questions.json, mscoco_{train,val}2014_annotations.json,
          images/{train,val}2014/COCO_{train,val}2014_<id:012d>.png
    textvqa/{train,val}_questions_vqa_format.json, {train,val}_annotations_vqa_format.json,
          train_images/<hex id>.png                       (no answer_type; question_type "none of the above")
    vizwiz/{train,val}_questions_vqa_format.json, {train,val}_annotations_vqa_format.json,
          {train,val}/VizWiz_<split>_<id:08d>.png         (image_id = file name; answers without answer_id;
                                                          questions about an absent shape are "unanswerable")
    hateful_memes/{train,dev}.jsonl, img/<id>.png         (text true of the image: 0, false: 1)
    imagenet/{train,val}/<class folder>/<n>.png, classnames.json (classes "red circle", ... single shapes)
    suite.json                                            (what was generated; written last)

Only the first two shapes splits are used (train, then val as the evaluated split: Hateful Memes
calls it dev). Image ``i`` depends only on ``(seed, i)``; the folder is published by one rename.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lavis.common.fileio import atomic_directory
from lavis.datasets import synthetic_shapes

VERSION = 1
SPLITS = ("train", "val")
DATASETS = ("flickr30k", "okvqa", "textvqa", "vizwiz", "hateful_memes", "imagenet")
IMAGENET_CLASSES = [f"{c} {s}" for c in synthetic_shapes.COLORS for s in synthetic_shapes.SHAPES]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _save(scene: dict, size: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_shapes.draw_scene(scene, size).save(path)


def _split_of(index: int, num_images: int, val_fraction: float) -> str:
    return "train" if index < num_images - max(1, round(num_images * val_fraction)) else "val"


def _vqa_rows(scene: dict, seed: int, index: int, image_id, vizwiz: bool):
    """(question record, annotation answers, question_type, answer_type) of each shapes question."""
    rows = synthetic_shapes.questions(scene, seed, index)
    if vizwiz:
        rng = np.random.default_rng([seed, index, 2])
        taken = {(s["color"], s["shape"]) for s in scene["shapes"]}
        absent = [k for k in synthetic_shapes.SHAPES if all(k != t[1] for t in taken)]
        if absent and rng.random() < 0.5:
            rows = rows[:4] + [(f"what color is the {absent[0]}?", "unanswerable", "unanswerable", "unanswerable")]
    return rows


def _vqa_files(root: Path, name: str, scenes: list, seed: int, size: int) -> None:
    for split in SPLITS:
        questions, annotations = [], []
        for index, scene in scenes:
            if scene["split"] != split:
                continue
            number = index + 1
            if name == "okvqa":
                subtype = f"{split}2014"
                image_id = number
                _save(scene, size, root / "images" / subtype / f"COCO_{subtype}_{image_id:012d}.png")
            elif name == "textvqa":
                image_id = f"{number * 7919:016x}"
                _save(scene, size, root / "train_images" / f"{image_id}.png")
            else:
                image_id = f"VizWiz_{split}_{number:08d}.png"
                _save(scene, size, root / split / image_id)
            for k, (question, answer, q_type, a_type) in enumerate(
                _vqa_rows(scene, seed, index, image_id, name == "vizwiz")
            ):
                qid = number * 10 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                if name == "vizwiz":
                    answers = [{"answer": answer, "answer_confidence": ("yes", "maybe")[j % 2]} for j in range(10)]
                    ann = {"question_id": qid, "image_id": image_id, "question_type": a_type, "answers": answers}
                else:
                    answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
                    ann = {
                        "question_id": qid,
                        "image_id": image_id,
                        "answers": answers,
                        "question_type": q_type if name == "okvqa" else "none of the above",
                    }
                    if name == "okvqa":
                        ann["answer_type"] = "other"
                        ann["confidence"] = 3
                        for a in answers:
                            a["raw_answer"] = answer
                annotations.append(ann)
        if name == "okvqa":
            common = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": f"{split}2014"}
            _write_json(
                root / f"OpenEnded_mscoco_{split}2014_questions.json",
                {**common, "task_type": "Open-Ended", "questions": questions},
            )
            _write_json(root / f"mscoco_{split}2014_annotations.json", {**common, "annotations": annotations})
        else:
            _write_json(root / f"{split}_questions_vqa_format.json", {"questions": questions})
            _write_json(root / f"{split}_annotations_vqa_format.json", {"annotations": annotations})


def _flickr30k(root: Path, scenes: list, size: int) -> None:
    images, coco_images, coco_anns, sent_id = [], [], [], 0
    for index, scene in scenes:
        image_id = 1_000_000 + index
        filename = f"{image_id}.png"
        _save(scene, size, root / "flickr30k-images" / filename)
        sentences = []
        for caption in synthetic_shapes.captions(scene):
            sentences.append({"tokens": caption.rstrip(".").split(), "raw": caption, "imgid": index, "sentid": sent_id})
            coco_anns.append({"image_id": image_id, "id": sent_id, "caption": caption})
            sent_id += 1
        split = "test" if scene["split"] == "val" else "train"
        images.append(
            {
                "filename": filename,
                "imgid": index,
                "split": split,
                "sentences": sentences,
                "sentids": [s["sentid"] for s in sentences],
            }
        )
        coco_images.append({"id": image_id, "file_name": filename})
    _write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    _write_json(
        root / "dataset_flickr30k_coco_style.json",
        {"info": {}, "licenses": [], "type": "captions", "images": coco_images, "annotations": coco_anns},
    )


def _hateful_memes(root: Path, scenes: list, seed: int, size: int) -> None:
    lines = {split: [] for split in SPLITS}
    for index, scene in scenes:
        meme_id = 10_000 + index
        _save(scene, size, root / "img" / f"{meme_id}.png")
        rng = np.random.default_rng([seed, index, 3])
        shape = scene["shapes"][0]
        label = int(rng.random() < 0.5)
        color = shape["color"]
        if label:  # a false statement about the image
            color = [c for c in synthetic_shapes.COLORS if c != color][
                int(rng.integers(len(synthetic_shapes.COLORS) - 1))
            ]
        lines[scene["split"]].append(
            {"id": meme_id, "img": f"img/{meme_id}.png", "label": label, "text": f"the {shape['shape']} is {color}"}
        )
    for split, name in (("train", "train"), ("val", "dev")):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(rec) + "\n" for rec in lines[split]), encoding="utf-8")


def _imagenet(root: Path, scenes: list, size: int) -> None:
    for index, scene in scenes:
        if scene["layout"] != "single":
            continue
        shape = scene["shapes"][0]
        label = IMAGENET_CLASSES.index(f"{shape['color']} {shape['shape']}")
        _save(scene, size, root / scene["split"] / f"c{label:04d}" / f"{index:06d}.png")
    for split in SPLITS:  # every class folder exists in every split (ImageFolder indexes folders)
        for label in range(len(IMAGENET_CLASSES)):
            (root / split / f"c{label:04d}").mkdir(parents=True, exist_ok=True)
    _write_json(root / "classnames.json", IMAGENET_CLASSES)


def write_suite(
    out: str | Path, num_images: int, seed: int = 0, image_size: int = 64, val_fraction: float = 0.2
) -> dict:
    """Generate every stand-in into ``out`` (which must not exist) atomically; returns the manifest."""
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2, got {num_images}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    scenes = []
    for index in range(num_images):
        scene = synthetic_shapes.sample_scene(seed, index, image_size)
        scene["split"] = _split_of(index, num_images, val_fraction)
        scenes.append((index, scene))
    with atomic_directory(out, replace=False) as tmp:
        tmp = Path(tmp)
        _flickr30k(tmp / "flickr30k", scenes, image_size)
        for name in ("okvqa", "textvqa", "vizwiz"):
            _vqa_files(tmp / name, name, scenes, seed, image_size)
        _hateful_memes(tmp / "hateful_memes", scenes, seed, image_size)
        _imagenet(tmp / "imagenet", scenes, image_size)
        manifest = {
            "generator": "lavis.datasets.synthetic_suite",
            "version": VERSION,
            "seed": seed,
            "num_images": num_images,
            "image_size": image_size,
            "val_fraction": val_fraction,
        }
        _write_json(tmp / "suite.json", manifest)
    return manifest

"""VQAv2: official question and annotation files, joined by question id.

``build_info`` holds one entry per split:
``{questions, annotations, images, image_name_format, shards}``.
- ``questions``: ``v2_OpenEnded_mscoco_<subtype>_questions.json``
  (``{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}``).
- ``annotations``: ``v2_mscoco_<subtype>_annotations.json``
  (``{"annotations": [{"question_id", "image_id", "answers": [{"answer", ...} x 10], ...}]}``);
  null for test-dev, whose items then have ``answers == []`` and ``answer == ""``.
- ``images``: the image folder; a question's file is ``image_name_format`` filled with
  ``data_subtype`` (from the questions file) and ``image_id``, by default
  ``COCO_{data_subtype}_{image_id:012d}.jpg``.

The training target ``answer`` is the most frequent of the ten raw answers; a tie
goes to the answer that comes first in annotation order.
"""

from __future__ import annotations

from collections import Counter
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
from lavis.datasets.samples import VQA


@dataclass
class VQASplitInfo:
    questions: Optional[str] = None
    annotations: Optional[str] = None
    images: Optional[str] = None
    image_name_format: str = "COCO_{data_subtype}_{image_id:012d}.jpg"
    shards: Optional[str] = None  # shard pattern (data_type: webdataset)


def _question_text_defaults() -> dict[str, dict[str, Any]]:
    return {"train": {"name": "question_text"}, "eval": {"name": "question_text"}}


@dataclass
class VQAConfig(BuilderConfig):
    # Text processor per role: {train: {name, ...}, eval: {name, ...}} (default question_text for both).
    text_processor: dict[str, dict[str, Any]] = field(default_factory=_question_text_defaults)
    # {split: {questions, annotations (null for test-dev), images, image_name_format, shards}}
    # (shapes_vqa: derived from shapes.root, any value given is replaced).
    build_info: dict[str, VQASplitInfo] = field(default_factory=dict)


def most_frequent_answer(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one first seen in annotation order ('' when none)."""
    if not answers:
        return ""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def read_questions(path: str) -> tuple[str, list[dict]]:
    """(data_subtype, questions) of an official questions file, checked field by field."""
    doc = read_json(path, "VQA questions file")
    questions = require_list(doc, "questions", path)
    for i, q in enumerate(questions):
        require(q, ("image_id", "question", "question_id"), path, f"questions[{i}]")
    return str(doc.get("data_subtype", "")), questions


def read_annotations(path: str) -> dict[int, dict]:
    """``{question_id: annotation}`` of an official annotations file, checked field by field."""
    doc = read_json(path, "VQA annotations file")
    out = {}
    for i, ann in enumerate(require_list(doc, "annotations", path)):
        where = f"annotations[{i}]" + (
            f" (question_id {ann['question_id']})" if isinstance(ann, dict) and "question_id" in ann else ""
        )
        require(ann, ("question_id", "image_id", "answers"), path, where)
        if not isinstance(ann["answers"], list):
            raise DataError(f"{path}: {where}: 'answers' is not a list")
        for j, answer in enumerate(ann["answers"]):
            require(answer, ("answer",), path, f"{where} answers[{j}]")
        out[ann["question_id"]] = ann
    return out


@registry.register_builder("vqav2")
class VQAv2Builder(BaseBuilder):
    """VQAv2 questions joined with their annotations (see the module docstring for the files)."""

    name = "vqav2"
    Config = VQAConfig

    def split_info(self, split: str):
        """The ``build_info`` entry of a split; ConfigError listing the configured splits otherwise."""
        if split not in self.cfg.build_info:
            known = ", ".join(self.cfg.build_info) or "(none)"
            raise ConfigError(
                f"{self.key_path}.build_info.{split}: split {split!r} is not described; described: {known}"
            )
        return self.cfg.build_info[split]

    def scoring_files(self, split: str) -> dict:
        """The question and annotation files used to score ``split`` (annotations None for test-dev)."""
        info = self.split_info(split)
        key = f"{self.key_path}.build_info.{split}"
        return {
            "question_file": path_or_error(info.questions, f"{key}.questions"),
            "annotation_file": str(info.annotations) if info.annotations else None,
        }

    def read_records(self, split, role):
        """One record per question, joined to its annotation (see the module docstring)."""
        info = self.split_info(split)
        files = self.scoring_files(split)
        subtype, questions = read_questions(files["question_file"])
        annotations = read_annotations(files["annotation_file"]) if files["annotation_file"] else None
        if role == "train" and annotations is None:
            raise ConfigError(f"{self.key_path}.build_info.{split}.annotations: a training split needs answers")
        images = path_or_error(info.images, f"{self.key_path}.build_info.{split}.images")
        records = []
        for q in questions:
            answers: list[str] = []
            if annotations is not None:
                ann = annotations.get(q["question_id"])
                if ann is None:
                    raise DataError(
                        f"{files['question_file']}: question_id {q['question_id']} has no annotation in "
                        f"{files['annotation_file']}"
                    )
                if ann["image_id"] != q["image_id"]:
                    raise DataError(
                        f"{files['annotation_file']}: question_id {q['question_id']} has image_id "
                        f"{ann['image_id']} but the questions file says {q['image_id']}"
                    )
                answers = [str(a["answer"]) for a in ann["answers"]]
            name = _image_name(info.image_name_format, subtype, q["image_id"], files["question_file"])
            records.append(
                {
                    "image_path": str(Path(images) / name),
                    "image_id": q["image_id"],
                    "question_id": q["question_id"],
                    "question": q["question"],
                    "answers": answers,
                    "answer": most_frequent_answer(answers),
                }
            )
        return records, VQA, files

    def shard_key(self, split):
        return f"build_info.{split}.shards"

    def shard_info(self, split, role):
        """Shard pattern, sample format and scoring files of a split stored as shards."""
        info = self.split_info(split)
        pattern = path_or_error(info.shards, f"{self.key_path}.{self.shard_key(split)}")
        if role == "train":
            # The shards hold the questions and answers: training reads no raw file (the paths are passed on
            # unread, for a run that also scores this split).
            return (
                pattern,
                VQA,
                {
                    "question_file": str(info.questions) if info.questions else None,
                    "annotation_file": str(info.annotations) if info.annotations else None,
                },
            )
        files = self.scoring_files(split)
        read_questions(files["question_file"])  # checked up front, like the image path
        return pattern, VQA, files


def _image_name(fmt: str, subtype: str, image_id, source: str) -> str:
    try:
        return fmt.format(data_subtype=subtype, image_id=image_id)
    except (KeyError, ValueError, IndexError) as err:
        raise ConfigError(
            f"image_name_format {fmt!r} cannot be filled for image_id {image_id!r} of {source}: {err}"
        ) from None

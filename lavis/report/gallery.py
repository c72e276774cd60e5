"""The gallery's data: every sample of every samples file as a compact row, images as embedded thumbnails.

The page stays small and fast at thousands of samples because nothing is repeated: each image is one
thumbnail (a ``data:`` URI) referred to by index, each prompt chunk (a demonstration's text, a query) is
one string of a shared table, and the page renders only the rows of the current page.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lavis.common.special_tokens import END_OF_CHUNK
from lavis.report.run_data import RunData, SampleFile
from lavis.runners.sample_log import LMMS_FIELDS, prediction, raw_response, read_samples

THUMBNAIL_PX = 96
# At most this many distinct demonstration images are embedded (a 32-shot evaluation of 5000 queries
# draws from tens of thousands); the others show their text and a placeholder.
MAX_DEMO_IMAGES = 2000
# Per-sample fields shown as filters when the samples have them.
FILTER_KEYS = ("answer_type", "question_type")
# Sample fields that are not scores even when numeric.
NOT_SCORES = {
    *LMMS_FIELDS,
    "image",
    "demo_ids",
    "demo_images",
    "image_id",
    "question_id",
    "demos_text_only",
    "id",
    "label",
}
# The score a gallery sorts by when the run's agg metric is not a per-sample key (classification: correct).
SCORE_PREFERENCE = ("vqa_accuracy", "CIDEr", "accuracy", "correct", "top1_correct", "exact_match")


class Thumbnails:
    """Images as small JPEG ``data:`` URIs, each file encoded once; a budget caps the demonstrations'."""

    def __init__(self, size: int = THUMBNAIL_PX, max_demo_images: int = MAX_DEMO_IMAGES):
        self.size = size
        self.max_demo_images = max_demo_images
        self.uris: list[str] = []
        self._index: dict[str, int | None] = {}
        self._demo_count = 0

    def add(self, path: str | None, demo: bool = False) -> int | None:
        """The index of ``path``'s thumbnail in :attr:`uris` (None: no file, unreadable, or over budget)."""
        if not path:
            return None
        if path in self._index:
            return self._index[path]
        if demo:
            if self._demo_count >= self.max_demo_images:
                return None
            self._demo_count += 1
        self._index[path] = index = self._encode(path)
        return index

    def _encode(self, path: str) -> int | None:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (self.size, self.size))  # JPEG: decode at a fraction of the size
                image = image.convert("RGB")
                image.thumbnail((self.size, self.size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
        except (OSError, ValueError):
            return None
        self.uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
        return len(self.uris) - 1


class TextTable:
    """Strings stored once, referred to by index."""

    def __init__(self):
        self.strings: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, text: str) -> int:
        index = self._index.get(text)
        if index is None:
            self._index[text] = index = len(self.strings)
            self.strings.append(text)
        return index


def prompt_chunks(prompt: str) -> list[str]:
    """A Flamingo prompt cut after each ``<|endofchunk|>``: the demonstrations' texts, then the query."""
    parts = prompt.split(END_OF_CHUNK)
    return [p + END_OF_CHUNK for p in parts[:-1]] + [parts[-1]]


def score_key(samples: Sequence[dict], preferred: str | None) -> str | None:
    """The per-sample score to sort by: ``preferred`` (the run's agg metric) when the samples have it."""
    numeric = {
        k
        for s in samples
        for k, v in s.items()
        if k not in NOT_SCORES and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for key in (preferred, *SCORE_PREFERENCE):
        if key in numeric:
            return key
    return min(numeric) if numeric else None


def _score(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def gallery_rows(samples: Sequence[dict], key: str | None, images: Thumbnails, texts: TextTable) -> list[dict]:
    """The compact rows of one samples file (see the module docstring)."""
    rows = []
    for s in samples:
        prompt = s.get("input") or ""
        chunks = prompt_chunks(prompt) if prompt else [""]
        demo_texts, query = chunks[:-1], chunks[-1]
        demo_images = s.get("demo_images") or []
        demos = []
        for i, text in enumerate(demo_texts):
            path = demo_images[i] if len(demo_images) == len(demo_texts) else None
            demos.append([images.add(path, demo=True), texts.add(text)])
        target = s.get("target")
        row = {
            "id": s.get("doc_id"),
            "img": images.add(s.get("image")),
            "demos": demos,
            "q": texts.add(query),
            "pred": prediction(s),
            "raw": raw_response(s),
            "target": target if isinstance(target, list) else ([] if target is None else [target]),
            "score": _score(s.get(key)) if key else None,
        }
        if s.get("question"):
            row["question"] = s["question"]
        for f in FILTER_KEYS:
            if f in s:
                row[f] = s[f]
        extra = {
            k: v
            for k, v in s.items()
            if k not in NOT_SCORES and k != key and k not in FILTER_KEYS and k != "question" and _score(v) is not None
        }
        if extra:
            row["scores"] = extra
        rows.append(row)
    return rows


def build_galleries(runs: Sequence[RunData], images: Thumbnails, texts: TextTable) -> list[dict]:
    """One gallery per (run, dataset/split, shots, trial) of ``runs``, trial 0 of each shot count first."""
    galleries = []
    for run_index, run in enumerate(runs):
        for group, files in run.galleries().items():
            for sample_file in files:
                galleries.append(_gallery(run, run_index, group, sample_file, images, texts))
    return galleries


def _gallery(
    run: RunData, run_index: int, group: str, sample_file: SampleFile, images: Thumbnails, texts: TextTable
) -> dict:
    samples = read_samples(sample_file.path)
    key = score_key(samples, run.agg_metric_name())
    rows = gallery_rows(samples, key, images, texts)
    title = group + (f" trial {sample_file.trial}" if sample_file.trial is not None else "")
    if sample_file.step is not None:
        title += f" (step {sample_file.step})"
    return {
        "id": f"r{run_index}:{sample_file.path.name}",
        "run": run.name,
        "run_index": run_index,
        "title": title,
        "group": group,
        "dataset": sample_file.dataset,
        "split": sample_file.split,
        "shots": sample_file.shots,
        "trial": sample_file.trial,
        "file": Path(sample_file.path).name,
        "score_key": key,
        "filters": {f: sorted({str(r[f]) for r in rows if f in r}) for f in FILTER_KEYS if any(f in r for r in rows)},
        "rows": rows,
    }

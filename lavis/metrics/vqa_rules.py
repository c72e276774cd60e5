"""The official VQAv2 per-question rule and the record checks shared by the VQA metrics (official, v2).

Split out of ``vqa.py`` so that OpenFlamingo v2's metric (``vqa_v2.py``) and the post-processing reuse them
without importing the metric module that dispatches to them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lavis.common.errors import DataError
from lavis.common.fileio import read_json
from lavis.metrics import record_field
from lavis.metrics.vqa_normalize import normalize_answer, normalize_whitespace


def _records(source: Any, key: str, what: str) -> tuple[list, str]:
    """Return (records, label) from a path, an official-format dict holding ``key``, or a list."""
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        data = read_json(source, f"{what} file")
    else:
        label, data = f"<{what} given in memory>", source
    if isinstance(data, dict) and key:
        if key not in data:
            raise DataError(f"{what} {label}: expected a JSON list or an object with a '{key}' list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{what} {label}: expected a list of records, got {type(data).__name__}")
    return data, label


def _column(records: list, name: str, types: tuple, label: str) -> list:
    """``[rec[name] for rec in records]`` with exact types checked at C speed; on any failure the slow
    per-record check runs to raise a DataError naming the record."""
    try:
        values = [rec[name] for rec in records]
    except (KeyError, TypeError, IndexError):
        values = None
    if values is None or not set(map(type, values)) <= set(types):
        for i, rec in enumerate(records):
            record_field(rec, name, types, label, i)
    return values


def _first_duplicate(ids: list, label: str, what: str = "question_id") -> DataError | None:
    if len(set(ids)) == len(ids):
        return None
    seen: dict = {}
    for i, qid in enumerate(ids):
        if qid in seen:
            return DataError(f"{label}: duplicate {what} {qid!r} in records #{seen[qid]} and #{i}")
        seen[qid] = i
    return None


def _locate_bad_answer(anns: list[dict], label: str) -> DataError:
    """Find the first malformed GT answer (slow path, only run once something failed)."""
    for ann in anns:
        for j, a in enumerate(ann["answers"]):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                return DataError(
                    f"{label}: question_id {ann['question_id']} answer #{j} must be an object "
                    f"with a string 'answer': {a!r:.120}"
                )
    return DataError(f"{label}: malformed GT answers")


def _sequential_sum(values: np.ndarray) -> float:
    """Left-to-right float sum (Python 2's ``sum``); ``np.cumsum`` is strictly sequential, ``np.sum`` is not."""
    return float(np.cumsum(values)[-1])


def _exact_question_accuracy(answers: list[dict], pred: str, normalize: bool) -> float:
    """The official per-question loop, used only when answer dicts may compare equal (repeated answer_id)."""
    clean = normalize_answer if normalize else (lambda s: s)
    gts = [dict(a, answer=clean(normalize_whitespace(a["answer"]))) for a in answers]
    pred = clean(normalize_whitespace(pred))
    total = 0.0
    for held_out in gts:
        matches = sum(1 for other in gts if other != held_out and other["answer"] == pred)
        total += min(1, matches / 3)
    return total / len(gts)


def _repeated_dict_rows(anns: list[dict], lengths: np.ndarray) -> list[int]:
    """Rows whose answer dicts are not guaranteed distinct (the official loop would then drop several)."""
    ids = [a.get("answer_id") for ann in anns for a in ann["answers"]]
    if lengths.min() == lengths.max():
        mat = np.asarray(ids)
        # Numeric ids compare like the dicts do (1 == 1.0 == True); anything else takes the slow path.
        if mat.dtype.kind in "iufb":
            mat = np.sort(mat.reshape(len(anns), -1), axis=1)
            return np.nonzero((mat[:, 1:] == mat[:, :-1]).any(axis=1))[0].tolist()
    rows, start = [], 0
    for r, n in enumerate(lengths.tolist()):
        chunk = ids[start : start + n]
        start += n
        if None in chunk or len({repr(i) for i in chunk}) < n:
            rows.append(r)
    return rows


def _question_accuracies(anns: list[dict], preds: list[str], always_normalize: bool, label: str) -> np.ndarray:
    """Unrounded official accuracy of each question (floats, same bits as the official code)."""
    lengths = np.fromiter((len(ann["answers"]) for ann in anns), dtype=np.int64, count=len(anns))
    # Intern every distinct raw string once (dict.fromkeys and map run at C speed); all string work below
    # is per distinct string.
    try:
        flat_raw = [a["answer"] for ann in anns for a in ann["answers"]]
        distinct = dict.fromkeys(flat_raw)
        distinct.update(dict.fromkeys(preds))
    except (KeyError, TypeError):
        raise _locate_bad_answer(anns, label) from None
    if not set(map(type, distinct)) <= {str}:
        raise _locate_bad_answer(anns, label)
    codes_of = {s: i for i, s in enumerate(distinct)}
    flat = list(map(codes_of.__getitem__, flat_raw))
    pred_codes = np.fromiter(map(codes_of.__getitem__, preds), dtype=np.int64, count=len(preds))
    ws_ids: dict[str, int] = {}
    norm_ids: dict[str, int] = {}
    norm_of_ws: dict[str, int] = {}
    raw_to_ws = np.empty(len(codes_of), dtype=np.int64)
    raw_to_norm = np.empty(len(codes_of), dtype=np.int64)
    for raw, code in codes_of.items():
        ws = normalize_whitespace(raw)
        raw_to_ws[code] = ws_ids.setdefault(ws, len(ws_ids))
        if ws not in norm_of_ws:
            norm_of_ws[ws] = norm_ids.setdefault(normalize_answer(ws), len(norm_ids))
        raw_to_norm[code] = norm_of_ws[ws]

    n_q, width = len(anns), int(lengths.max())
    valid = np.arange(width)[None, :] < lengths[:, None]
    raw = np.full((n_q, width), -1, dtype=np.int64)
    raw[valid] = np.asarray(flat, dtype=np.int64)  # row-major fill keeps each question's answer order
    gt_ws = np.where(valid, raw_to_ws[raw], -1)
    gt_norm = np.where(valid, raw_to_norm[raw], -1)

    # The official gate: normalise only when the whitespace-cleaned GT answers are not all identical.
    all_same = ((gt_ws == gt_ws[:, :1]) | ~valid).all(axis=1)
    normalized = np.ones(n_q, dtype=bool) if always_normalize else ~all_same
    match = (
        np.where(
            normalized[:, None], gt_norm == raw_to_norm[pred_codes][:, None], gt_ws == raw_to_ws[pred_codes][:, None]
        )
        & valid
    )
    count = match.sum(axis=1)
    # Leave-one-out: dropping a matching answer leaves count-1 matches, dropping another leaves count.
    per_subset = np.minimum(1.0, (count[:, None] - match) / 3.0)
    total = np.zeros(n_q)
    for j in range(width):  # column by column = the official left-to-right sum within each question
        total = total + np.where(valid[:, j], per_subset[:, j], 0.0)
    acc = total / lengths
    for r in _repeated_dict_rows(anns, lengths):
        acc[r] = _exact_question_accuracy(anns[r]["answers"], preds[r], bool(normalized[r]))
    return acc

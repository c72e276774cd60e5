"""VQA accuracy as OpenFlamingo v2 computes it (open_flamingo/eval/vqa_metric.py @ 655f693).

The same per-question rule as the official VQAv2 accuracy (``lavis.metrics.vqa``), with v2's differences:

1. No gate: the GT answers and the prediction are *always* normalised (punctuation, digits, articles).
2. The scored questions are the entries of the results list, in list order, with no check that they cover
   the annotation file; groups appear in the order of their first entry.
3. A question id repeated in the results is scored once per entry, each time with the answer of its
   *last* entry; its GT answers, normalised in place by the original, are normalised once more per repeat.
4. A missing ``answer_type`` counts as ``"other"`` (TextVQA and VizWiz have none).
5. Leave-one-out removes every GT answer dict *equal* to the held-out one (whole-dict equality, after
   normalisation). VizWiz's answers carry no ``answer_id``, so identical ``{answer, answer_confidence}``
   dicts are removed together: 10 x ("yes", "yes") and the prediction "yes" scores 0.
6. Python 3 ``round(x, 2)`` on ``100 * acc`` per question and ``100 * mean`` per group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lavis.common.errors import DataError
from lavis.metrics.vqa_normalize import normalize_answer, normalize_whitespace
from lavis.metrics.vqa_rules import _column, _first_duplicate, _question_accuracies, _records, _sequential_sum


def _annotations(annotations: Any) -> tuple[dict[int, dict], str]:
    records, label = _records(annotations, "annotations", "VQA annotations")
    qids = _column(records, "question_id", (int,), label)
    _column(records, "question_type", (str,), label)
    answers = _column(records, "answers", (list,), label)
    for i, (qid, ans) in enumerate(zip(qids, answers)):
        if not ans:
            raise DataError(f"{label}: record #{i} (question_id {qid}) has no GT answers to score against")
    dup = _first_duplicate(qids, label)
    if dup:
        raise dup
    return dict(zip(qids, records)), label


def _renormalized(ann: dict, times: int) -> dict:
    """``ann`` with its GT answers normalised ``times`` more times (the original's in-place repeats)."""
    answers = []
    for a in ann["answers"]:
        text = a["answer"]
        for _ in range(times):
            text = normalize_answer(normalize_whitespace(text))
        answers.append(dict(a, answer=text))
    return dict(ann, answers=answers)


def vqa_accuracy_v2(questions: Any, annotations: Any, results: Any, per_question: bool = False) -> dict:
    """OpenFlamingo v2's VQA accuracy (0-100) of ``results`` (see the module docstring).

    ``questions``: path, parsed dict or list of question records, or None to skip the id check.
    ``annotations``: path, parsed dict or list of annotation records (``answer_type`` optional).
    ``results``: path or list of ``{"question_id", "answer"}`` (repeated ids allowed, scored per entry).
    Returns ``{"overall", "perQuestionType", "perAnswerType", "scored_entries"}`` and, with
    ``per_question``, ``"perQuestion": {question_id: accuracy}``. Bad input raises DataError.
    """
    by_id, ann_label = _annotations(annotations)
    records, res_label = _records(results, "", "VQA results")
    qids = _column(records, "question_id", (int,), res_label)
    answers = _column(records, "answer", (str,), res_label)
    if not qids:
        raise DataError(f"{res_label}: no results to score")
    known = None
    if questions is not None:
        q_records, q_label = _records(questions, "questions", "VQA questions")
        known = set(_column(q_records, "question_id", (int,), q_label))
    for i, qid in enumerate(qids):
        if qid not in by_id:
            raise DataError(f"{res_label}: record #{i} has question_id {qid}, which has no annotation in {ann_label}")
        if known is not None and qid not in known:
            raise DataError(f"{res_label}: record #{i} has question_id {qid}, which is not in the questions {q_label}")
    last_answer = dict(zip(qids, answers))
    seen: dict[int, int] = {}
    anns = []
    for qid in qids:
        repeat = seen.get(qid, 0)
        seen[qid] = repeat + 1
        anns.append(_renormalized(by_id[qid], repeat) if repeat else by_id[qid])
    acc = _question_accuracies(anns, [last_answer[q] for q in qids], True, ann_label)

    def group_means(keys: list[str]) -> dict[str, float]:
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        return {k: round(100 * _sequential_sum(acc[np.asarray(rows)]) / len(rows), 2) for k, rows in groups.items()}

    out: dict[str, Any] = {
        "overall": round(100 * _sequential_sum(acc) / len(acc), 2),
        "perQuestionType": group_means([ann["question_type"] for ann in anns]),
        "perAnswerType": group_means([ann.get("answer_type", "other") for ann in anns]),
        "scored_entries": len(qids),
    }
    if per_question:
        out["perQuestion"] = {qid: round(v, 2) for qid, v in zip(qids, (100 * acc).tolist())}
    return out

"""VQAv2 accuracy exactly as the official evaluation computes it (GT-Vision-Lab/VQA vqaEval.py @ a013f00).

Per question, with ``gt`` the annotator answers (10 in VQAv2) and ``pred`` the predicted answer:

1. ``gt`` and ``pred`` get ``\\n``/``\\t`` -> space and ``strip()``.
2. Only when the GT answers are not all identical (after step 1, case-sensitive) are the GT answers *and*
   the prediction normalised (``lavis.metrics.vqa_normalize``); otherwise the prediction is compared raw,
   so GT = 10 x "yes" and prediction "Yes" scores 0. ``always_normalize=True`` normalises in every case
   (not official, but what most people expect).
3. accuracy = mean over the leave-one-out subsets (drop one GT answer each time) of
   ``min(1, #matches / 3)``; with ``c`` matching GT answers out of 10 this is 0, .3, .6, .9, 1 for c = 0..4+.
4. ``perQuestion`` = round(100 * acc, 2); ``overall``, ``perQuestionType[t]``, ``perAnswerType[t]`` =
   round(100 * mean of the unrounded accuracies of the group, 2).

Bit-for-bit fidelity: the float sums are done in the official order (answers in file order, questions in
annotation-file order) and rounding is half away from zero on the exact binary value, as Python 2's
``round`` (which produced the published numbers) did. Speed: each distinct string is normalised once and
the leave-one-out is computed from match counts with numpy: ~40x faster than the official loop on
200k questions (benchmarks/vqa_metric.py).

Which questions are scored: by default those present in the results (a subset evaluation, as OpenFlamingo
does); ``all_questions=True`` requires the results to cover exactly the annotated questions, like the
official ``loadRes``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import numpy as np

from lavis.common.errors import DataError, UserError
from lavis.common.fileio import gc_paused, read_json
from lavis.metrics import write_submission
from lavis.metrics.vqa_rules import _column, _first_duplicate, _question_accuracies, _records, _sequential_sum


def _load_annotations(annotations: Any) -> tuple[list[dict], list[int], str]:
    records, label = _records(annotations, "annotations", "VQA annotations")
    qids = _column(records, "question_id", (int,), label)
    _column(records, "question_type", (str,), label)
    _column(records, "answer_type", (str,), label)
    answers = _column(records, "answers", (list,), label)
    if not all(answers):
        i = next(i for i, a in enumerate(answers) if not a)
        # The official code divides by the number of answers (test-dev files have none).
        raise DataError(f"{label}: record #{i} (question_id {qids[i]}) has no GT answers to score against")
    dup = _first_duplicate(qids, label)
    if dup:
        raise dup
    return records, qids, label


def _load_question_ids(questions: Any) -> tuple[set[int] | None, str]:
    if questions is None:
        return None, ""
    records, label = _records(questions, "questions", "VQA questions")
    ids = _column(records, "question_id", (int,), label)
    dup = _first_duplicate(ids, label)
    if dup:
        raise dup
    return set(ids), label


def _load_predictions(
    results: Any, ann_ids: set[int], ann_label: str, question_ids: set[int] | None, q_label: str
) -> tuple[dict[int, str], str]:
    records, label = _records(results, "", "VQA results")
    qids = _column(records, "question_id", (int,), label)
    answers = _column(records, "answer", (str,), label)
    dup = _first_duplicate(qids, label)
    if dup:
        raise dup
    for known, where in (
        (question_ids, f"is not in the questions {q_label}"),
        (ann_ids, f"has no annotation in {ann_label}"),
    ):
        if known is not None and not known.issuperset(qids):
            i = next(i for i, qid in enumerate(qids) if qid not in known)
            raise DataError(f"{label}: record #{i} has question_id {qids[i]}, which {where}")
    return dict(zip(qids, answers)), label


_ROUND_CACHE: dict[float, float] = {}


def round_official(value: float) -> float:
    """Round to 2 decimals half away from zero on the exact binary value, as Python 2's ``round`` does."""
    out = _ROUND_CACHE.get(value)
    if out is None:
        out = float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
        if len(_ROUND_CACHE) < 100_000:
            _ROUND_CACHE[value] = out
    return out


def _group_means(keys: list[str], acc: np.ndarray) -> dict[str, float]:
    """Official ``round(100 * sum / len, 2)`` per group, groups in order of first appearance."""
    codes: dict[str, int] = {}
    group = np.fromiter((codes.setdefault(k, len(codes)) for k in keys), dtype=np.int64, count=len(keys))
    order = np.argsort(group, kind="stable")  # stable: keeps question order inside each group
    bounds = np.searchsorted(group[order], np.arange(len(codes) + 1))
    out = {}
    for key, g in codes.items():
        members = acc[order[bounds[g] : bounds[g + 1]]]
        out[key] = round_official(100 * _sequential_sum(members) / len(members))
    return out


@gc_paused()  # its tables are millions of small acyclic objects (see fileio.gc_paused)
def vqa_accuracy(
    questions: Any,
    annotations: Any,
    results: Any,
    per_question: bool = False,
    always_normalize: bool = False,
    all_questions: bool = False,
) -> dict:
    """Official VQAv2 accuracy of ``results`` on a 0-100 scale.

    ``questions``: path to the official questions JSON, its parsed dict, or the list of question records
    (or None to skip the check that result ids are known questions). ``annotations``: path, parsed dict or
    list of annotation records. ``results``: path or list of ``{"question_id", "answer"}``.
    By default the questions present in ``results`` are scored; ``all_questions=True`` requires exactly the
    annotated questions (official ``loadRes``). ``always_normalize=True`` normalises even when all GT
    answers are identical (not official). Returns ``{"overall", "perQuestionType", "perAnswerType"}`` and,
    with ``per_question=True``, ``"perQuestion": {question_id: accuracy}``. Bad input raises DataError.
    """
    ann_records, ann_qids, ann_label = _load_annotations(annotations)
    question_ids, q_label = _load_question_ids(questions)
    preds, res_label = _load_predictions(results, set(ann_qids), ann_label, question_ids, q_label)
    if not preds:
        raise DataError(f"{res_label}: no results to score")
    if all_questions and len(preds) != len(ann_qids):
        missing = [qid for qid in ann_qids if qid not in preds]
        raise DataError(
            f"{res_label}: results cover {len(preds)} of the {len(ann_qids)} annotated questions "
            f"of {ann_label} (all_questions=True); missing question_ids, first ones: {missing[:10]}"
        )
    # Official order: the annotation file's order, whatever the order of the results.
    anns = [ann for ann, qid in zip(ann_records, ann_qids) if qid in preds]
    acc = _question_accuracies(anns, [preds[ann["question_id"]] for ann in anns], always_normalize, ann_label)
    out: dict[str, Any] = {
        "overall": round_official(100 * _sequential_sum(acc) / len(acc)),
        "perQuestionType": _group_means([ann["question_type"] for ann in anns], acc),
        "perAnswerType": _group_means([ann["answer_type"] for ann in anns], acc),
    }
    if per_question:
        out["perQuestion"] = {ann["question_id"]: round_official(v) for ann, v in zip(anns, (100 * acc).tolist())}
    return out


def vqa_sample_scores(
    questions: Any, annotations: Any, results: Any, always_normalize: bool = False, metric: str = "official"
) -> tuple[dict, dict]:
    """``(accuracy, {question_id: fields})`` of ``results``: :func:`vqa_accuracy` and each question's record.

    A question's fields: ``vqa_accuracy`` (the official per-question accuracy, 0-100, as ``perQuestion``),
    ``target`` (its GT answers, file order), ``question_type``, ``answer_type`` and ``question`` (the text,
    when the questions file is given). Arguments as for :func:`vqa_accuracy`; ``metric="openflamingo_v2"``
    scores with OpenFlamingo v2's rules instead (lavis/metrics/vqa_v2.py; ``always_normalize`` is implied).
    """
    if isinstance(questions, (str, os.PathLike)):
        questions = read_json(questions, "VQA questions file")
    if isinstance(annotations, (str, os.PathLike)):
        annotations = read_json(annotations, "VQA annotations file")
    if metric == "openflamingo_v2":
        from lavis.metrics.vqa_v2 import vqa_accuracy_v2

        accuracy = vqa_accuracy_v2(questions, annotations, results, per_question=True)
        accuracy.pop("scored_entries")
    else:
        accuracy = vqa_accuracy(questions, annotations, results, per_question=True, always_normalize=always_normalize)
    per_question = accuracy.pop("perQuestion")
    text = {}
    if questions is not None:
        records, _ = _records(questions, "questions", "VQA questions")
        text = {q.get("question_id"): q.get("question") for q in records if isinstance(q, dict)}
    anns, _ = _records(annotations, "annotations", "VQA annotations")
    fields = {}
    for ann in anns:
        qid = ann["question_id"]
        if qid in per_question:
            fields[qid] = {
                "vqa_accuracy": per_question[qid],
                "target": [a["answer"] for a in ann["answers"]],
                "question_type": ann["question_type"],
                "answer_type": ann.get("answer_type", "other"),
            }
            if qid in text:
                fields[qid]["question"] = text[qid]
    return accuracy, fields


def write_vqa_results(records: list[dict], path: str | os.PathLike) -> None:
    """Write predictions in the official submission format ``[{"question_id", "answer"}]``, atomically.

    Extra keys of ``records`` are dropped; a missing field, a wrong type or a repeated question_id raises
    DataError.
    """
    write_submission(records, path, "question_id", int, "answer", "VQA results")


def main(argv: list[str] | None = None) -> int:
    """CLI: print the accuracy of a results file as one JSON object on stdout."""
    parser = argparse.ArgumentParser(prog="python -m lavis.metrics.vqa", description=main.__doc__)
    parser.add_argument("--questions", help="official questions JSON (omit to skip the id check)")
    parser.add_argument("--annotations", required=True, help="official annotations JSON")
    parser.add_argument(
        "--results",
        required=True,
        help="results JSON: [{question_id, answer}] (with --postprocess, raw generations: "
        "[{question_id, generation}] or the raw text in answer)",
    )
    parser.add_argument("--per-question", action="store_true", help="add perQuestion accuracies")
    parser.add_argument(
        "--always-normalize",
        action="store_true",
        help="normalise even when all GT answers are identical (not official)",
    )
    parser.add_argument(
        "--all-questions",
        action="store_true",
        help="require results for every annotated question (official loadRes; the CLI's default)",
    )
    parser.add_argument(
        "--allow-partial", action="store_true", help="score the questions the results answer even when some are missing"
    )
    parser.add_argument(
        "--postprocess",
        choices=["none", "openflamingo_v2"],
        default="none",
        help="turn raw generations into answers first (openflamingo_v2: cut at Question/Answer/"
        "Short, then at ', '); also makes openflamingo_v2 the default --metric",
    )
    parser.add_argument(
        "--stemmer",
        choices=["none", "okvqa"],
        default="none",
        help="stem the post-processed answers (okvqa: OpenFlamingo's OK-VQA stemmer)",
    )
    parser.add_argument(
        "--metric",
        choices=["official", "openflamingo_v2"],
        help="official VQAv2 rules, or OpenFlamingo v2's (always normalise, score every "
        "results entry); default: openflamingo_v2 with --postprocess openflamingo_v2",
    )
    args = parser.parse_args(argv)
    metric = args.metric or ("openflamingo_v2" if args.postprocess == "openflamingo_v2" else "official")
    try:
        from lavis.metrics.coverage import check_coverage

        scored = check_coverage(args.results, args.annotations, "question_id", args.allow_partial)
        results: Any = args.results
        if args.postprocess != "none" or args.stemmer != "none":
            from lavis.metrics.postprocess import postprocess_results

            results = postprocess_results(args.results, args.postprocess, args.stemmer)
        if metric == "openflamingo_v2":
            from lavis.metrics.vqa_v2 import vqa_accuracy_v2

            metrics = vqa_accuracy_v2(args.questions, args.annotations, results, per_question=args.per_question)
        else:
            metrics = vqa_accuracy(
                args.questions,
                args.annotations,
                results,
                per_question=args.per_question,
                always_normalize=args.always_normalize,
                all_questions=args.all_questions,
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(scored, file=sys.stderr)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

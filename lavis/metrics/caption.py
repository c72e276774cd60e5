"""COCO caption metrics with pycocoevalcap 1.2: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE.

The numbers are those of ``pycocoevalcap.eval.COCOEvalCap`` (same tokenisation, same scorer classes, same
image order), multiplied by 100. Differences from that class, none of which changes a score:

* the captions are tokenised in ONE Java call (references and candidates together; ``-preserveLines``
  makes every line independent) in a private temporary directory, not in the installed package folder;
* Java line breaks that the official wrapper does not replace (``\\r``, ``\\v``, ``\\f``, U+2028, U+2029)
  become spaces, as ``\\n`` does: left in, they would shift every later caption onto the wrong image;
* SPICE runs only when its Stanford CoreNLP models are installed (``coco-caption/get_stanford_models.sh``);
  otherwise it is skipped with a note under ``"skipped"`` instead of downloading them at run time;
* per-image SPICE values are matched to their images by id (the official class mis-assigns them when the
  image ids are not sorted).

Which images are scored: by default those present in the results (as LAVIS and OpenFlamingo do, so CIDEr's
document frequencies come from those images' references); ``all_images=True`` scores every image of the
annotation file and requires a caption for each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from lavis.common.errors import ConfigError, DataError, UserError
from lavis.common.fileio import read_json
from lavis.metrics import record_field, write_submission

log = logging.getLogger(__name__)

# Scorer name -> the result keys it produces.
METRIC_KEYS = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
DEFAULT_METRICS = ("CIDEr", "BLEU", "METEOR", "ROUGE_L", "SPICE")
_ALIASES = {
    "bleu": "BLEU",
    "meteor": "METEOR",
    "rouge_l": "ROUGE_L",
    "rouge": "ROUGE_L",
    "cider": "CIDEr",
    "cider-d": "CIDEr",
    "spice": "SPICE",
}
# Characters Java's line reader treats as line ends; the official wrapper only replaces "\n".
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})


def _package_dir(sub: str) -> str:
    import pycocoevalcap

    # pycocoevalcap is a namespace package (no __init__.py, so no __file__).
    return os.path.join(os.path.abspath(list(pycocoevalcap.__path__)[0]), sub)


def spice_models_present() -> bool:
    """True when SPICE's Stanford CoreNLP 3.6.0 jars are in pycocoevalcap's ``spice/lib`` folder."""
    lib = _package_dir(os.path.join("spice", "lib"))
    return all(os.path.isfile(os.path.join(lib, f"stanford-corenlp-3.6.0{s}.jar")) for s in ("", "-models"))


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise UserError(
            "caption metrics need Java (OpenJDK 17 works) on the PATH for the PTB tokenizer, "
            "METEOR and SPICE; install it (e.g. `conda install openjdk=17`)"
        )
    return java


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Tokenise like pycocoevalcap's PTBTokenizer: Stanford PTB, lower case, punctuation tokens removed."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    punctuation = frozenset(PUNCTUATIONS)
    jar = os.path.join(_package_dir("tokenizer"), STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(c.translate(_LINE_BREAKS) + "\n" for c in captions))
        proc = subprocess.run(
            [
                _java(),
                "-cp",
                jar,
                "edu.stanford.nlp.process.PTBTokenizer",
                "-encoding",
                "utf-8",
                "-preserveLines",
                "-lowerCase",
                path,
            ],
            capture_output=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) != len(captions) + 1 or lines[-1]:
        raise RuntimeError(f"PTBTokenizer returned {len(lines) - 1} lines for {len(captions)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[:-1]]


def resolve_metrics(metrics: Any) -> list[str]:
    """Metric names (case-insensitive, a list or a comma-separated string) -> canonical METRIC_KEYS names."""
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    chosen = []
    for m in metrics:
        name = _ALIASES.get(str(m).strip().lower())
        if name is None:
            raise ConfigError(f"unknown caption metric {m!r}; known: {', '.join(METRIC_KEYS)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ConfigError(f"no caption metric chosen; known: {', '.join(METRIC_KEYS)}")
    return chosen


def _load_references(annotations: Any) -> tuple[dict[Any, list[str]], str]:
    """{image_id: [reference captions]} in the order of the file's ``images`` (pycocotools' order)."""
    if isinstance(annotations, (str, os.PathLike)):
        label, data = os.fspath(annotations), read_json(annotations, "caption annotations file")
    else:
        label, data = "<caption annotations given in memory>", annotations
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{label}: expected the COCO captions format, an object with an 'annotations' list")
    refs: dict[Any, list[str]] = {}
    for i, img in enumerate(data.get("images") or []):
        refs.setdefault(record_field(img, "id", (int, str), f"{label} images", i), [])
    for i, ann in enumerate(data["annotations"]):
        image_id = record_field(ann, "image_id", (int, str), f"{label} annotations", i)
        caption = record_field(ann, "caption", str, f"{label} annotations", i)
        if data.get("images") and image_id not in refs:
            raise DataError(f"{label}: annotation #{i} refers to image_id {image_id!r}, which is not in 'images'")
        refs.setdefault(image_id, []).append(caption)
    return refs, label


def _load_candidates(results: Any, refs: dict[Any, list[str]], ref_label: str) -> tuple[dict[Any, str], str]:
    if isinstance(results, (str, os.PathLike)):
        label, data = os.fspath(results), read_json(results, "caption results file")
    else:
        label, data = "<caption results given in memory>", results
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a JSON list of {{image_id, caption}}, got {type(data).__name__}")
    cands: dict[Any, str] = {}
    first: dict[Any, int] = {}
    for i, rec in enumerate(data):
        image_id = record_field(rec, "image_id", (int, str), label, i)
        caption = record_field(rec, "caption", str, label, i)
        if image_id in cands:
            raise DataError(f"{label}: duplicate image_id {image_id!r} in records #{first[image_id]} and #{i}")
        if image_id not in refs:
            raise DataError(f"{label}: record #{i} has image_id {image_id!r}, which is not in {ref_label}")
        cands[image_id] = caption
        first[image_id] = i
    if not cands:
        raise DataError(f"{label}: no captions to score")
    return cands, label


def _score(name: str, gts: dict, res: dict) -> tuple[list[float], list[list[float]]]:
    """Corpus and per-image values (raw fractions) of one scorer, one list entry per result key."""
    # pycocoevalcap prints progress; keep our stdout for the caller (the CLI prints one JSON object there).
    with contextlib.redirect_stdout(sys.stderr):
        if name == "BLEU":
            from pycocoevalcap.bleu.bleu import Bleu

            corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
            return [float(c) for c in corpus], [[float(v) for v in p] for p in per_image]
        if name == "SPICE":
            from pycocoevalcap.spice.spice import Spice

            corpus, per_image = Spice().compute_score(gts, res)
            # Spice scores images in sorted id order; map back to ours.
            by_id = dict(zip(sorted(gts), per_image))
            return [float(corpus)], [[float(by_id[i]["All"]["f"]) for i in gts]]
        if name == "METEOR":
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
        elif name == "ROUGE_L":
            from pycocoevalcap.rouge.rouge import Rouge

            scorer = Rouge()
        else:
            from pycocoevalcap.cider.cider import Cider

            scorer = Cider()
        corpus, per_image = scorer.compute_score(gts, res)
        del scorer  # Meteor stops its Java process when collected
        return [float(corpus)], [[float(v) for v in per_image]]


def caption_metrics(
    annotations: Any, results: Any, metrics: Any = DEFAULT_METRICS, all_images: bool = False, per_image: bool = False
) -> dict:
    """COCO caption metrics of ``results`` on a 0-100 scale (keys Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE).

    ``annotations``: path to, or parsed dict of, an official ``captions_*.json``. ``results``: path or list of
    ``{"image_id", "caption"}``, one per image. ``metrics``: names from BLEU, METEOR, ROUGE_L, CIDEr, SPICE
    (a list or a comma-separated string; METEOR and SPICE are slow). By default the images present in the
    results are scored; ``all_images=True`` scores every annotated image and requires a caption for each.
    SPICE without its Stanford models is skipped and reported under ``"skipped"``. ``per_image=True`` adds
    ``"perImage": {image_id: {key: value}}``. Bad input raises DataError, an unknown metric ConfigError.
    """
    chosen = resolve_metrics(metrics)
    refs, ref_label = _load_references(annotations)
    cands, res_label = _load_candidates(results, refs, ref_label)
    if all_images:
        missing = [i for i in refs if i not in cands]
        if missing:
            raise DataError(
                f"{res_label}: no caption for {len(missing)} of the {len(refs)} images of {ref_label} "
                f"(all_images=True); first missing image_ids: {missing[:10]}"
            )
    image_ids = [i for i in refs if i in cands]  # annotation-file order, as pycocotools gives it
    no_refs = [i for i in image_ids if not refs[i]]
    if no_refs:
        raise DataError(f"{ref_label}: no reference caption for image_ids {no_refs[:10]}")

    skipped: dict[str, str] = {}
    if "SPICE" in chosen and not spice_models_present():
        skipped["SPICE"] = (
            "Stanford CoreNLP 3.6.0 models not found in pycocoevalcap/spice/lib; "
            "run coco-caption/get_stanford_models.sh to enable SPICE"
        )
        log.warning("SPICE skipped: %s", skipped["SPICE"])
        chosen.remove("SPICE")

    sentences = [c for i in image_ids for c in refs[i]] + [cands[i] for i in image_ids]
    tokens = iter(ptb_tokenize(sentences) if chosen else [])
    gts = {i: [next(tokens) for _ in refs[i]] for i in image_ids} if chosen else {}
    res = {i: [next(tokens)] for i in image_ids} if chosen else {}

    out: dict[str, Any] = {}
    images: dict[Any, dict[str, float]] = {i: {} for i in image_ids}
    for name in chosen:
        corpus, per = _score(name, gts, res)
        for key, value, values in zip(METRIC_KEYS[name], corpus, per):
            out[key] = 100.0 * value
            for image_id, v in zip(image_ids, values):
                images[image_id][key] = 100.0 * v
    out["num_images"] = len(image_ids)
    if skipped:
        out["skipped"] = skipped
    if per_image:
        out["perImage"] = images
    return out


def caption_sample_scores(annotations: Any, results: Any, metrics: Any = DEFAULT_METRICS) -> tuple[dict, dict]:
    """``(corpus metrics, {image_id: {"target": [references], key: value}})`` of ``results``.

    The per-image values are those of the very computation that gives the corpus scores (pycocoevalcap's
    per-image scores, x100): the corpus CIDEr is the mean of the per-image CIDEr. ``annotations`` and
    ``results`` are as for :func:`caption_metrics`; the references are the annotation file's captions.
    """
    if isinstance(annotations, (str, os.PathLike)):
        annotations = read_json(annotations, "caption annotations file")
    out = caption_metrics(annotations, results, metrics=metrics, per_image=True)
    per_image = out.pop("perImage")
    refs, _ = _load_references(annotations)
    return out, {image_id: {"target": refs[image_id], **values} for image_id, values in per_image.items()}


def write_caption_results(records: list[dict], path: str | os.PathLike) -> None:
    """Write ``[{"image_id", "caption"}]`` in the COCO results format, atomically; extra keys are dropped."""
    write_submission(records, path, "image_id", (int, str), "caption", "caption results")


def main(argv: list[str] | None = None) -> int:
    """CLI: print the caption metrics of a results file as one JSON object on stdout."""
    parser = argparse.ArgumentParser(prog="python -m lavis.metrics.caption", description=main.__doc__)
    parser.add_argument("--annotations", required=True, help="official captions_*.json ground truth")
    parser.add_argument("--results", required=True, help="results JSON: [{image_id, caption}]")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated subset of {','.join(METRIC_KEYS)} (default: all)",
    )
    parser.add_argument(
        "--all-images", action="store_true", help="score every annotated image (the CLI's default; see --allow-partial)"
    )
    parser.add_argument(
        "--allow-partial", action="store_true", help="score the images the results caption even when some are missing"
    )
    parser.add_argument("--per-image", action="store_true", help="add perImage values")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    # Java children (SPICE) inherit file descriptor 1: point it at stderr until the JSON is printed.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        from lavis.metrics.coverage import check_coverage

        scored = check_coverage(args.results, args.annotations, "image_id", args.allow_partial)
        metrics = caption_metrics(
            args.annotations,
            args.results,
            metrics=args.metrics,
            all_images=not args.allow_partial,
            per_image=args.per_image,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(scored, file=sys.stderr)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Post-processing of raw generations into answers and captions, per evaluation protocol.

``openflamingo_v2`` (open_flamingo/eval @ 655f693, ``vqa_metric.postprocess_vqa_generation`` and
``coco_metric.postprocess_captioning_generation``), quirks kept because the published numbers used them:

* VQA: cut at the first of the substrings ``Question``, ``Answer``, ``Short`` (case-sensitive, also inside
  a word: ``" Shortstop"`` gives ``" "``), then at the first ``", "``. No strip, no lower-casing (the metric
  strips later). OK-VQA then stems the result (``lavis.metrics.okvqa_stemmer``).
* Captions: cut at the first ``Output`` (also inside ``Outputs``), delete every ASCII ``"``. No strip.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lavis.common.errors import ConfigError

_V2_CUT = re.compile("Question|Answer|Short")

VQA_POSTPROCESSORS = ("none", "openflamingo_v2")
STEMMERS = ("none", "okvqa")


def postprocess_caption(text: str) -> str:
    """OpenFlamingo's caption clean-up: cut where the model starts a new ``Output:`` prompt, drop quotes."""
    return text.split("Output", 1)[0].replace('"', "").strip()


def postprocess_answer(text: str) -> str:
    """OpenFlamingo's answer clean-up: cut at the next prompt word, keep the first clause."""
    text = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", text, maxsplit=1)[0].strip()


def postprocess_vqa_v2(text: str) -> str:
    """OpenFlamingo v2's answer clean-up (see the module docstring)."""
    return _V2_CUT.split(text, maxsplit=1)[0].split(", ", 1)[0]


def postprocess_caption_v2(text: str) -> str:
    """OpenFlamingo v2's caption clean-up (see the module docstring)."""
    return text.split("Output", 1)[0].replace('"', "")


def vqa_postprocessor(postprocess: str = "openflamingo_v2", stemmer: str = "none") -> Callable[[list[str]], list[str]]:
    """A function from raw generations to answers for a protocol (``postprocess``) and ``stemmer``."""
    if postprocess not in VQA_POSTPROCESSORS:
        raise ConfigError(
            f"VQA post-processing {postprocess!r} is unknown; choose one of {', '.join(VQA_POSTPROCESSORS)}"
        )
    if stemmer not in STEMMERS:
        raise ConfigError(f"VQA answer stemmer {stemmer!r} is unknown; choose one of {', '.join(STEMMERS)}")
    cut = postprocess_vqa_v2 if postprocess == "openflamingo_v2" else (lambda text: text)
    if stemmer == "okvqa":
        from lavis.metrics.okvqa_stemmer import get_stemmer

        stem = get_stemmer()
        return lambda texts: stem.stem_many(cut(t) for t in texts)
    return lambda texts: [cut(t) for t in texts]


def postprocess_results(results, postprocess: str = "openflamingo_v2", stemmer: str = "none") -> list[dict]:
    """``[{question_id, answer}]`` from a results file (or list) of raw generations, post-processed.

    Each record's raw text is its ``generation`` field, or else its ``answer`` field.
    """
    from lavis.common.errors import DataError
    from lavis.metrics.vqa_rules import _records

    records, label = _records(results, "", "VQA results")
    texts = []
    for i, rec in enumerate(records):
        text = rec.get("generation", rec.get("answer")) if isinstance(rec, dict) else None
        if not isinstance(text, str) or "question_id" not in rec:
            raise DataError(
                f"{label}: record #{i} needs a question_id and a string generation (or answer): {rec!r:.120}"
            )
        texts.append(text)
    answers = vqa_postprocessor(postprocess, stemmer)(texts)
    return [{"question_id": rec["question_id"], "answer": a} for rec, a in zip(records, answers)]

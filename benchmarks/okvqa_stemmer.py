"""OK-VQA post-processing: lavis's batch stemmer vs a straightforward per-answer implementation.

Both apply OpenFlamingo v2's rules (cut at Question/Answer/Short and ", ", then the OK-VQA stemmer: nltk
``word_tokenize`` + ``pos_tag``, the manual table, WordNet verb lemmas for ``-ing``, ``inflection.singularize``
for plural nouns). The baseline is what OpenFlamingo's ``postprocess_ok_vqa_generation`` does and what a user
would write: for every answer, tokenize, tag and apply the rules from scratch (one shared lemmatizer, nltk's
own cached tagger). lavis (``vqa_postprocessor("openflamingo_v2", "okvqa")``) stems each distinct string once,
caches tags per token sequence and lemmas per word, and splits plain space-separated words without nltk's
tokenizer (identical tokens, see lavis/metrics/okvqa_stemmer.py).

Data: 5000 seeded model-like generations. Answers are drawn with Zipf weights (model answers repeat:
"yes", "two", "red" ...) from the OK-VQA conformance set's strings (tests/fixtures/eval_suite/okvqa) and
then varied as a model does (leading space, capitals, a trailing period, a ", second clause", a runaway
"\\nQuestion:..." continuation). Both implementations run on the same list in the same process; the
outputs must be identical. The speed-up is printed last as ``okvqa_postprocess_speedup=X``.

    .venv/bin/python benchmarks/okvqa_stemmer.py [--results 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import inflection
import nltk

from lavis.metrics.okvqa_stemmer import MANUAL_MATCHES, OKVQAStemmer
from lavis.metrics.postprocess import vqa_postprocessor

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval_suite" / "okvqa"


def generations(n: int, seed: int) -> list[str]:
    """``n`` model-like raw generations (see the module docstring)."""
    rng = random.Random(seed)
    base = sorted({c["after_split"].strip() for c in json.loads((FIXTURE / "stemmer_cases.json").read_text())} - {""})
    rng.shuffle(base)
    weights = [1.0 / (rank + 1) for rank in range(len(base))]
    out = []
    for answer in rng.choices(base, weights=weights, k=n):
        r = rng.random()
        if r < 0.15:
            answer = answer.capitalize()
        elif r < 0.25:
            answer += "."
        elif r < 0.35:
            answer += ", " + rng.choice(base)
        if rng.random() < 0.3:
            answer += "\nQuestion:What is " + rng.choice(base)
        out.append((" " if rng.random() < 0.8 else "") + answer)
    return out


def baseline(texts: list[str]) -> list[str]:
    """Per answer, from scratch: OpenFlamingo's post-processing and stemmer rules."""
    lemmatizer = nltk.stem.WordNetLemmatizer()
    out = []
    for text in texts:
        text = re.split("Question|Answer|Short", text, maxsplit=1)[0]
        text = re.split(", ", text, maxsplit=1)[0]
        words = []
        for word, tag in nltk.pos_tag(nltk.word_tokenize(text)):
            if word in MANUAL_MATCHES:
                word = MANUAL_MATCHES[word]
            elif word.endswith("ing"):
                word = lemmatizer.lemmatize(word, "v")
            elif tag.startswith("NNS") or tag.startswith("NNPS"):
                word = inflection.singularize(word)
            words.append(word)
        out.append(" ".join(words))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts = generations(args.results, args.seed)
    OKVQAStemmer().stem("warming up nltk's models and wordnet")  # load the data once, outside both timings
    baseline(["warming up the baseline's lemmatizer and tagger"])

    start = time.perf_counter()
    expected = baseline(texts)
    t_baseline = time.perf_counter() - start

    import lavis.metrics.okvqa_stemmer as module

    module._STEMMER = OKVQAStemmer()  # fresh caches: nothing carried over from the warm-up
    start = time.perf_counter()
    got = vqa_postprocessor("openflamingo_v2", "okvqa")(texts)
    t_lavis = time.perf_counter() - start

    assert got == expected, next((t, a, b) for t, a, b in zip(texts, got, expected) if a != b)
    print(f"{len(texts)} generations, {len(set(texts))} distinct; identical answers: {len(got)}")
    print(f"baseline (per answer, from scratch): {t_baseline:.3f} s")
    print(f"lavis (batch, cached):               {t_lavis:.3f} s")
    print(f"okvqa_postprocess_speedup={t_baseline / t_lavis:.1f}")


if __name__ == "__main__":
    main()

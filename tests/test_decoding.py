"""Decoded captions and answers hold no special-token text (lavis/models/decoding.py).

Reference: OpenFlamingo's tokenizer (transformers 4.28) decoded with ``skip_special_tokens=True``, which
drops every special token; ``tokenizer_ids.json`` holds its decodes of real prompts. transformers 5's
tokenizer keeps ``<s>``, ``</s>`` and ``<unk>`` as text, so the plain ``batch_decode`` would differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lavis.models.decoding import decode_text, decode_texts, special_token_ids
from lavis.models.flamingo.tokenizer import load_llama_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "openflamingo_reference"
SPECIALS = ("<s>", "</s>", "<unk>", "<PAD>", "<image>", "<|endofchunk|>")


@pytest.fixture(scope="module")
def llama_tokenizer():
    return load_llama_tokenizer(str(FIXTURE / "llama"))


def test_every_special_token_is_known(llama_tokenizer):
    ids = special_token_ids(llama_tokenizer)
    assert {llama_tokenizer.convert_tokens_to_ids(t) for t in SPECIALS} <= ids


def test_the_plain_decode_keeps_special_text_and_ours_matches_openflamingo(llama_tokenizer):
    # The bug this module exists for: transformers 5 keeps them (OpenFlamingo's tokenizer gave '\x02').
    assert "<s>" in llama_tokenizer.decode([5, 1, 2, 0], skip_special_tokens=True)
    assert decode_text(llama_tokenizer, [5, 1, 2, 0]) == "\x02"


@pytest.mark.parametrize("special", SPECIALS)
def test_decoding_reference_prompts_with_each_special_token_inserted(llama_tokenizer, special):
    cases = json.loads((FIXTURE / "tokenizer_ids.json").read_text())["cases"]
    special_id = llama_tokenizer.convert_tokens_to_ids(special)
    checked = 0
    for case in cases:
        ids, expected = case["input_ids"], case["decode_skip_special_tokens"]
        assert decode_text(llama_tokenizer, ids) == expected, case["text"]
        # Anywhere a generated special token lands, the reference decoder drops it and decodes the rest.
        for position in sorted({0, len(ids) // 2, len(ids)}):
            varied = ids[:position] + [special_id, special_id] + ids[position:]
            assert decode_text(llama_tokenizer, varied) == expected, (case["text"], position)
            checked += 1
    assert checked >= len(cases)
    rows = decode_texts(llama_tokenizer, torch.tensor([[special_id, 5], [5, special_id]]))
    assert rows == ["\x02", "\x02"]


@pytest.mark.parametrize("special", [s for s in SPECIALS if s != "<|endofchunk|>"])
def test_text_generated_by_the_tiny_model_never_shows_special_tokens(special):
    """The tiny model is made to generate ``special`` (a sequence bias), and the task's text has none of it."""
    from omegaconf import OmegaConf

    from lavis.models import load_model_and_preprocess
    from lavis.tasks.captioning import CaptioningTask

    model, _, _ = load_model_and_preprocess("openflamingo", "tiny")
    tok = model.tokenizer
    special_id = tok.convert_tokens_to_ids(special)
    word_id = tok.convert_tokens_to_ids("▁red")
    prompt = tok(["<image>Output:"], return_tensors="pt")
    batch = {
        "vision_x": torch.zeros(1, 1, 1, 3, model.image_size, model.image_size),
        "lang_x": prompt["input_ids"],
        "attention_mask": prompt["attention_mask"],
    }
    task = CaptioningTask(
        OmegaConf.create(
            {
                "run": {
                    "metrics": ["CIDEr"],
                    "agg_metric": "CIDEr",
                    "num_beams": 1,
                    "max_new_tokens": 4,
                    "min_new_tokens": 0,
                    "length_penalty": 0.0,
                }
            }
        )
    )
    new = model.generate(
        batch["vision_x"],
        batch["lang_x"],
        batch["attention_mask"],
        max_new_tokens=4,
        sequence_bias={(special_id,): 50.0},
    )
    assert (new == special_id).all(), new  # it really generated the special token
    (text,) = task.generate_text(model, batch, sequence_bias={(special_id,): 50.0})
    assert text == ""
    # Mixed with a word, the word stays and the special token goes.
    new = model.generate(
        batch["vision_x"],
        batch["lang_x"],
        batch["attention_mask"],
        max_new_tokens=4,
        sequence_bias={(special_id,): 50.0, (special_id, word_id): 100.0},
    )
    assert word_id in new.tolist()[0] and special_id in new.tolist()[0], new
    (text,) = task.generate_text(model, batch, sequence_bias={(special_id,): 50.0, (special_id, word_id): 100.0})
    assert special not in text and "red" in text, text

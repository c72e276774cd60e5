"""Flamingo prompts, label masks and collators, checked token by token with the fixture LLaMA tokenizer.

Expected ids come from tests/fixtures/llama_tokenizer/tokenizer_ids.json, produced by the
OpenFlamingo reference (transformers 4.28 legacy LLaMA tokenisation).
"""

import json
from pathlib import Path

import pytest
import torch

from lavis.common.errors import ConfigError, DataError
from lavis.datasets.collators import CaptionCollator, VQACollator
from lavis.datasets.fewshot import FewShotDataset
from lavis.datasets.prompts import (
    CAPTION_TEMPLATE,
    IGNORE_INDEX,
    VQA_TEMPLATE,
    PromptTemplate,
    answer_token_mask,
    resolve_template,
)
from lavis.datasets.samples import SplitDataset
from lavis.models.flamingo.tokenizer import load_llama_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "llama_tokenizer"
REFERENCE = {case["text"]: case for case in json.loads((FIXTURE / "tokenizer_ids.json").read_text())["cases"]}
FEWSHOT_PROMPT = (
    "<image>Output:A man riding a horse on a beach.<|endofchunk|>"
    "<image>Output:A bowl of oranges on a table.<|endofchunk|><image>Output:"
)
VQA_PROMPT = (
    "<image>Question:How many dogs are there? Short answer:2<|endofchunk|><image>Question:Is it sunny? Short answer:"
)
BOS, EOC, MEDIA, PAD = 1, 640, 641, 642


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama_tokenizer(str(FIXTURE))


def image(value: float, size: int = 4) -> torch.Tensor:
    return torch.full((3, size, size), float(value))


def caption_item(image_id, caption=None, value=0.0):
    item = {"image": image(value), "image_id": image_id}
    if caption is not None:
        item["text_input"] = caption
    return item


def vqa_item(question_id, question, answer="yes", answers=None, value=0.0, image_id=None):
    return {
        "image": image(value),
        "text_input": question,
        "answer": answer,
        "answers": answers if answers is not None else [answer] * 10,
        "question_id": question_id,
        "image_id": image_id if image_id is not None else question_id * 10,
    }


def test_fixture_tokenizer_reproduces_reference_ids(tokenizer):
    assert (tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]), tokenizer.pad_token_id) == (
        [EOC, MEDIA],
        PAD,
    )
    for text, case in REFERENCE.items():
        assert tokenizer(text).input_ids == case["input_ids"], text


def test_caption_train_worked_example_token_by_token(tokenizer):
    batch = CaptionCollator(tokenizer, role="train")([caption_item(7, "A man riding a horse on a beach.")])
    # The first chunk of the reference few-shot prompt: <s> <image> ▁Output : A ▁man ... . <|endofchunk|>
    expected_ids = REFERENCE[FEWSHOT_PROMPT]["input_ids"][:14]
    assert batch["lang_x"].tolist() == [expected_ids]
    assert tokenizer.convert_ids_to_tokens(expected_ids)[2:5] == ["▁Output", ":", "A"]
    # BOS, <image>, "▁Output", ":" are masked; "A" (no ▁: it continues the prompt's segment) to <|endofchunk|> learnt.
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 4 + expected_ids[4:]]
    assert batch["attention_mask"].tolist() == [[1] * 14]
    assert batch["image_id"] == [7]
    assert tokenizer.decode(expected_ids[4:]) == "A man riding a horse on a beach.<|endofchunk|>"


def test_vqa_train_worked_example_token_by_token(tokenizer):
    item = vqa_item(3, "How many dogs are there?", answer="2", answers=["two"] * 10)
    batch = VQACollator(tokenizer, role="train")([item])
    expected_ids = REFERENCE[VQA_PROMPT]["input_ids"][:23]  # up to and including the first <|endofchunk|>
    assert expected_ids[-3:] == [620, 624, EOC]  # ":" "2" <|endofchunk|>
    assert batch["lang_x"].tolist() == [expected_ids]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 21 + [624, EOC]]
    assert (batch["question_id"], batch["image_id"]) == ([3], [30])


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<image>Output:", "A man riding a horse on a beach.<|endofchunk|>"),
        ("<image>Output:", " A dog with a leading space.<|endofchunk|>"),
        ("<image>Output:", "naïve café ☕<|endofchunk|>"),
        ("<image>", "A picture of 12 cats.<|endofchunk|>"),
        (FEWSHOT_PROMPT, "Two cats on a sofa.<|endofchunk|>"),
        ("<image>Question:Is it sunny? Short answer:", "no<|endofchunk|>"),
    ],
)
def test_label_mask_offsets_and_prefix_agree_and_use_whole_text_ids(tokenizer, text, answer):
    whole = text + answer
    masks = {}
    for method in ("offsets", "prefix"):
        ids, (mask,) = answer_token_mask(tokenizer, [whole], [len(text)], method)
        # The ids fed to the model are those of the whole string, whatever the method.
        assert ids == [tokenizer(whole).input_ids]
        masks[method] = mask
    assert masks["offsets"] == masks["prefix"]
    ids = tokenizer(whole).input_ids
    first = masks["offsets"].index(True)
    assert all(masks["offsets"][first:]) and not any(masks["offsets"][:first])
    # The learnt tokens spell exactly the answer (up to sentencepiece's dummy-prefix space).
    assert tokenizer.decode(ids[first:]).strip() == answer.strip()


def test_concatenating_piece_ids_would_differ_from_whole_text(tokenizer):
    """Why the mask is computed on the whole text: the pieces tokenised apart give other ids."""
    prompt, answer = "<image>Output:", "A man<|endofchunk|>"
    pieces = tokenizer(prompt).input_ids + tokenizer(answer, add_special_tokens=False).input_ids
    assert pieces != tokenizer(prompt + answer).input_ids
    batch = CaptionCollator(tokenizer, role="train")([caption_item(1, "A man")])
    assert batch["lang_x"][0].tolist() == tokenizer(prompt + answer).input_ids


def test_train_batch_is_right_padded(tokenizer):
    items = [caption_item(1, "A dog."), caption_item(2, "A bowl of oranges on a table.")]
    batch = CaptionCollator(tokenizer, role="train")(items)
    short = len(tokenizer("<image>Output:A dog.<|endofchunk|>").input_ids)
    width = batch["lang_x"].shape[1]
    assert width == len(tokenizer("<image>Output:A bowl of oranges on a table.<|endofchunk|>").input_ids)
    assert batch["lang_x"][0, short:].tolist() == [PAD] * (width - short)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (width - short)
    assert batch["lang_x"][0, 0].item() == BOS and batch["labels"][0, short - 1].item() == EOC
    assert batch["attention_mask"][1].all()
    assert batch["vision_x"].shape == (2, 1, 1, 3, 4, 4)


def test_eval_batch_is_left_padded_and_ends_on_the_prompt(tokenizer):
    items = [vqa_item(1, "Is it sunny?"), vqa_item(2, "How many dogs are there in the picture?")]
    batch = VQACollator(tokenizer, role="eval")(items)
    assert "labels" not in batch
    ids = [tokenizer(p).input_ids for p in batch["prompt"]]
    assert batch["prompt"][0] == "<image>Question:Is it sunny? Short answer:"
    width = batch["lang_x"].shape[1]
    pad = width - len(ids[0])
    assert batch["lang_x"][0].tolist() == [PAD] * pad + ids[0]
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(ids[0])
    assert batch["lang_x"][1].tolist() == ids[1]
    # Every row ends with the prompt's last token, where generation continues.
    assert batch["lang_x"][:, -1].tolist() == [620, 620]
    assert batch["question_id"] == [1, 2] and batch["text_input"][0] == "Is it sunny?"
    assert batch["answers"][0] == ["yes"] * 10 and batch["num_demos"] == [0, 0]


def test_fewshot_caption_prompt_matches_reference_and_images_are_in_order(tokenizer):
    demos = [
        caption_item(11, "A man riding a horse on a beach.", 1.0),
        caption_item(12, "A bowl of oranges on a table.", 2.0),
    ]
    query = caption_item(5, value=3.0)
    query["demos"] = demos
    batch = CaptionCollator(tokenizer, role="eval")([query])
    assert batch["prompt"] == [FEWSHOT_PROMPT]
    assert batch["lang_x"].tolist() == [REFERENCE[FEWSHOT_PROMPT]["input_ids"]]
    assert batch["attention_mask"].all()
    assert batch["vision_x"].shape == (1, 3, 1, 3, 4, 4)
    # Demo images first, in demo order, the query's last: the order of the <image> tokens.
    assert batch["vision_x"][0, :, 0, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch["image_id"] == [5] and batch["num_demos"] == [2]


def test_train_with_demos_learns_only_the_query_answer(tokenizer):
    query = caption_item(5, "Two cats on a sofa.", value=3.0)
    query["demos"] = [caption_item(11, "A man riding a horse on a beach.", 1.0)]
    batch = CaptionCollator(tokenizer, role="train")([query])
    ids = batch["lang_x"][0].tolist()
    learnt = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert (
        tokenizer.decode(ids) == "<s><image> Output:A man riding a horse on a beach.<|endofchunk|>"
        "<image> Output:Two cats on a sofa.<|endofchunk|>"
    )
    assert tokenizer.decode(learnt) == "Two cats on a sofa.<|endofchunk|>"
    assert batch["vision_x"][0, :, 0, 0, 0, 0].tolist() == [1.0, 3.0]


def test_vqa_demo_answer_option(tokenizer):
    demo = vqa_item(9, "What color is it?", answer="red", answers=["dark red", "red"] + ["red"] * 8)
    query = vqa_item(1, "Is it sunny?")
    query["demos"] = [demo]
    default = VQACollator(tokenizer, role="eval")([query])["prompt"][0]
    first = VQACollator(tokenizer, role="eval", demo_answer="first")([query])["prompt"][0]
    assert default.startswith("<image>Question:What color is it? Short answer:red<|endofchunk|>")
    assert first.startswith("<image>Question:What color is it? Short answer:dark red<|endofchunk|>")
    assert first.endswith("<image>Question:Is it sunny? Short answer:")
    with pytest.raises(ConfigError, match="demo_answer"):
        VQACollator(tokenizer, role="eval", demo_answer="last")


class ListDataset(SplitDataset):
    def __init__(self, items, sample_id_key="image_id"):
        self.items, self.sample_id_key = items, sample_id_key

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return dict(self.items[index])

    def sample_ids(self):
        return [item[self.sample_id_key] for item in self.items]


def test_zero_shot_text_demos_have_no_image_token_and_no_image(tokenizer):
    pool = ListDataset([caption_item(i, f"A cat number {i}.", value=10.0 + i) for i in range(6)])
    queries = ListDataset([caption_item(100 + i, value=float(i)) for i in range(2)])
    data = FewShotDataset(queries, pool, num_shots=0, seed=1, zero_shot_text_demos=True)
    items = [data[0], data[1]]
    batch = CaptionCollator(tokenizer, role="eval")(items)
    for item, prompt, row in zip(items, batch["prompt"], batch["lang_x"]):
        captions = [pool.items[j]["text_input"] for j in item["demo_indices"]]
        assert len(captions) == 2
        assert prompt == "".join(f"Output:{c}<|endofchunk|>" for c in captions) + "<image>Output:"
        assert (row == MEDIA).sum().item() == 1
    # Effective shots 2, but only the query image is given.
    assert batch["vision_x"].shape == (2, 1, 1, 3, 4, 4)
    assert batch["vision_x"][:, 0, 0, 0, 0, 0].tolist() == [0.0, 1.0]
    plain = FewShotDataset(queries, pool, num_shots=0, seed=1)
    assert CaptionCollator(tokenizer, role="eval")([plain[0]])["prompt"] == ["<image>Output:"]


def test_train_truncation_cuts_the_right_and_refuses_samples_with_no_answer_left(tokenizer):
    caption = "A man riding a horse on a beach."
    full = CaptionCollator(tokenizer, role="train")([caption_item(1, caption)])
    cut = CaptionCollator(tokenizer, role="train", max_length=8)([caption_item(1, caption)])
    assert cut["lang_x"].tolist() == [full["lang_x"][0, :8].tolist()]
    assert cut["labels"].tolist() == [full["labels"][0, :8].tolist()]
    with pytest.raises(DataError, match=r"image_id=1: .*max_length=4"):
        CaptionCollator(tokenizer, role="train", max_length=4)([caption_item(1, caption)])


def test_eval_truncation_drops_oldest_demos_with_their_images(tokenizer):
    long_caption = "A man riding a horse on a beach near the sea and a dog on the sand."
    long_demos = [caption_item(10 + i, long_caption, value=i + 1) for i in range(3)]
    short_demos = [caption_item(20 + i, "A dog.", value=i + 11) for i in range(3)]
    rows = [caption_item(1, value=100.0), caption_item(2, value=200.0)]
    rows[0]["demos"], rows[1]["demos"] = long_demos, short_demos
    chunk = len(tokenizer(f"<image>Output:{long_caption}<|endofchunk|>").input_ids) - 1
    short_chunk = len(tokenizer("<image>Output:A dog.<|endofchunk|>").input_ids) - 1
    query_len = len(tokenizer("<image>Output:").input_ids)
    limit = query_len + chunk  # room for one long demonstration, or all three short ones
    assert 3 * short_chunk <= chunk
    batch = CaptionCollator(tokenizer, role="eval", max_length=limit)(rows)
    assert batch["num_demos"] == [1, 3]
    assert batch["prompt"][0] == f"<image>Output:{long_caption}<|endofchunk|><image>Output:"
    assert batch["lang_x"].shape[1] <= limit
    vision = batch["vision_x"][:, :, 0, 0, 0, 0]
    # Row 0 keeps the last demo's image then its query image; the trailing slots are zeros, never attended.
    assert vision[0].tolist() == [3.0, 100.0, 0.0, 0.0]
    assert vision[1].tolist() == [11.0, 12.0, 13.0, 200.0]
    with pytest.raises(DataError, match="query prompt alone"):
        CaptionCollator(tokenizer, role="eval", max_length=query_len - 1)(rows)


def test_batch_errors_name_the_sample(tokenizer):
    collator = CaptionCollator(tokenizer, role="eval")
    a, b = caption_item(1), caption_item(2)
    a["demos"] = [caption_item(3, "A cat.")]
    with pytest.raises(DataError, match="same number of demos"):
        collator([a, b])
    with pytest.raises(DataError, match=r"image_id=4: field 'text_input' contains the special token <image>"):
        CaptionCollator(tokenizer, role="train")([caption_item(4, "A <image> cat.")])
    with pytest.raises(DataError, match="image_id=5.*needs 'text_input'"):
        CaptionCollator(tokenizer, role="train")([caption_item(5)])
    bad = caption_item(6)
    bad["image"] = torch.zeros(3, 8, 8)
    with pytest.raises(DataError, match="share one"):
        collator([caption_item(7), bad])


def test_templates_are_configurable_and_validated(tokenizer):
    collator = CaptionCollator(tokenizer, role="train", prompt={"prompt": "<image>A photo of"})
    batch = collator([caption_item(1, " a dog.")])
    assert tokenizer.decode(batch["lang_x"][0]) == "<s><image> A photo of a dog.<|endofchunk|>"
    assert tokenizer.decode([t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]).strip() == (
        "a dog.<|endofchunk|>"
    )
    assert resolve_template(None, VQA_TEMPLATE) is VQA_TEMPLATE
    assert resolve_template("<image>Q:{question} A:", VQA_TEMPLATE).query(question="Why?") == "<image>Q:Why? A:"
    with pytest.raises(ConfigError, match="exactly once"):
        resolve_template({"prompt": "Output:"}, CAPTION_TEMPLATE)
    with pytest.raises(ConfigError, match=r"unknown prompt field\(s\) \['questoin'\]; allowed: question"):
        resolve_template("<image>Question:{questoin}", VQA_TEMPLATE)
    with pytest.raises(ConfigError, match="must end with <|endofchunk|>"):
        PromptTemplate("<image>Output:", "{caption}", target="caption")
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_template({"promt": "<image>"}, CAPTION_TEMPLATE)


def test_tokenizer_without_flamingo_tokens_is_refused():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(FIXTURE / "tokenizer.json")), bos_token="<s>", unk_token="<unk>"
    )
    with pytest.raises(ConfigError, match="no pad token"):
        CaptionCollator(raw, role="train")
    raw.add_special_tokens({"pad_token": "<PAD>"})
    with pytest.raises(ConfigError, match="no <image> token"):
        CaptionCollator(raw, role="train")

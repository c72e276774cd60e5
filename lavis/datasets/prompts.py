"""Flamingo prompt formats and the training label mask.

A Flamingo sample is text interleaved with ``<image>`` tokens; each (image, text) chunk ends with
``<|endofchunk|>``, which is also where generation stops. A :class:`PromptTemplate` splits one chunk
into the *prompt* (what the model is given: ``<image>Output:``) and the *answer* (what it must
produce: ``{caption}<|endofchunk|>``). Training text and few-shot demonstrations are prompt + answer;
an evaluation query is the prompt alone.

Labels keep only the answer's tokens (its ``<|endofchunk|>`` included). The boundary is found on the
tokenisation of the *whole* text, never by tokenising the prompt on its own and counting: LLaMA's
sentencepiece tokeniser joins characters across the boundary (``Output:`` + ``A man`` is
``▁Output : A ▁man``, whereas ``A man`` alone is ``▁A ▁man``), so the ids fed to the model must be
those of the whole string, and the mask is derived from them.

The collators live in :mod:`lavis.datasets.collators`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from lavis.common.errors import ConfigError, DataError
from lavis.common.special_tokens import END_OF_CHUNK, IGNORE_INDEX, MEDIA_TOKEN

# Item keys set by lavis.datasets.fewshot.FewShotDataset and read by the collators.
DEMOS_KEY = "demos"
TEXT_ONLY_DEMOS_KEY = "demos_text_only"

LabelMethod = Literal["auto", "offsets", "prefix"]


def _field_names(fmt: str, where: str) -> list[str]:
    """The ``{name}`` fields of a format string (a ConfigError for a malformed one)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{where}: {fmt!r} is not a valid format string ({err})") from None


@dataclass(frozen=True)
class PromptTemplate:
    """One Flamingo chunk split into ``prompt`` (given to the model) and ``answer`` (the target).

    ``prompt`` must contain ``<image>`` exactly once; ``answer`` must contain the ``target`` field
    exactly once, no ``<image>``, and end with ``<|endofchunk|>`` (generation stops there).
    ``prompt_fields`` are the fields the prompt may use (e.g. ``question``).
    """

    prompt: str
    answer: str
    target: str
    prompt_fields: tuple[str, ...] = ()

    def __post_init__(self):
        where = f"prompt template {self.prompt!r} + {self.answer!r}"
        if self.prompt.count(MEDIA_TOKEN) != 1:
            raise ConfigError(f"{where}: the prompt must contain {MEDIA_TOKEN} exactly once")
        if MEDIA_TOKEN in self.answer:
            raise ConfigError(f"{where}: the answer must not contain {MEDIA_TOKEN}")
        if END_OF_CHUNK in self.prompt or not self.answer.endswith(END_OF_CHUNK):
            raise ConfigError(
                f"{where}: the answer must end with {END_OF_CHUNK} (the token generation stops on) "
                "and the prompt must not contain it"
            )
        answer_fields = _field_names(self.answer, where)
        if answer_fields != [self.target]:
            raise ConfigError(f"{where}: the answer must use the field {{{self.target}}} once, found {answer_fields}")
        unknown = sorted(set(_field_names(self.prompt, where)) - set(self.prompt_fields))
        if unknown:
            allowed = ", ".join(self.prompt_fields) or "none"
            raise ConfigError(f"{where}: unknown prompt field(s) {unknown}; allowed: {allowed}")

    def with_text(self, prompt: str | None = None, answer: str | None = None) -> PromptTemplate:
        """A copy with the prompt and/or answer text replaced (validated again)."""
        return PromptTemplate(
            prompt if prompt is not None else self.prompt,
            answer if answer is not None else self.answer,
            self.target,
            self.prompt_fields,
        )

    def query(self, **fields: str) -> str:
        """The evaluation prompt of one sample, e.g. ``<image>Output:``."""
        return self.prompt.format(**fields)

    def training(self, **fields: str) -> tuple[str, int]:
        """Prompt + answer of one sample, and the character index where the answer starts."""
        prompt = self.query(**fields)
        return prompt + self.answer.format(**{self.target: fields[self.target]}), len(prompt)


CAPTION_TEMPLATE = PromptTemplate("<image>Output:", "{caption}<|endofchunk|>", target="caption")
VQA_TEMPLATE = PromptTemplate(
    "<image>Question:{question} Short answer:",
    "{answer}<|endofchunk|>",
    target="answer",
    prompt_fields=("question",),
)


def resolve_template(prompt, default: PromptTemplate) -> PromptTemplate:
    """A template from a collator's ``prompt`` argument.

    Accepts None (the default), a :class:`PromptTemplate`, a str (the prompt part only) or a mapping
    with ``prompt`` and/or ``answer`` keys (as written in a YAML config).
    """
    if prompt is None:
        return default
    if isinstance(prompt, PromptTemplate):
        return prompt
    if isinstance(prompt, str):
        return default.with_text(prompt=prompt)
    if isinstance(prompt, Mapping):
        unknown = sorted(set(prompt) - {"prompt", "answer"})
        if unknown:
            raise ConfigError(f"prompt template: unknown key(s) {unknown}; allowed: answer, prompt")
        return default.with_text(prompt=prompt.get("prompt"), answer=prompt.get("answer"))
    raise ConfigError(f"prompt template: expected a string or a mapping, got {type(prompt).__name__}")


def check_text_field(value, key: str, sample: str) -> str:
    """``value`` as prompt text; a DataError if it is not a string or would inject Flamingo tokens."""
    if not isinstance(value, str):
        raise DataError(f"{sample}: field {key!r} must be a string, got {type(value).__name__}")
    for token in (MEDIA_TOKEN, END_OF_CHUNK):
        # A literal <image> in a caption would shift every following image by one.
        if token in value:
            raise DataError(f"{sample}: field {key!r} contains the special token {token}: {value!r}")
    return value


def strip_media(text: str) -> str:
    """``text`` without its ``<image>`` tokens (OpenFlamingo's text-only 0-shot demonstrations)."""
    return text.replace(MEDIA_TOKEN, "")


def special_token_id(tokenizer, token: str) -> int:
    """The id of an added special token; a ConfigError when the tokenizer lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(
            f"the tokenizer has no {token} token: add <|endofchunk|> and <image> as additional special "
            "tokens and <PAD> as the pad token (the model's tokenizer does)"
        )
    return token_id


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def answer_token_mask(
    tokenizer,
    texts: Sequence[str],
    answer_starts: Sequence[int],
    method: LabelMethod = "auto",
) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of each whole text, and for each token whether it belongs to the answer.

    The answer is ``text[answer_start:]``. A token counts as answer when it covers any answer
    character (so a token merged across the boundary is learnt, not dropped). ``method``:
    ``offsets`` uses the fast tokenizer's offset mapping; ``prefix`` tokenises ``text[:answer_start]``
    and takes the tokens after its longest common prefix with the whole text's tokens (any
    tokenizer); ``auto`` picks ``offsets`` for fast tokenizers. Both give the same mask whenever the
    boundary is not merged.
    """
    if len(texts) != len(answer_starts):
        raise ValueError("texts and answer_starts differ in length")
    if method == "auto":
        method = "offsets" if getattr(tokenizer, "is_fast", False) else "prefix"
    if method == "offsets":
        encoded = tokenizer(list(texts), return_offsets_mapping=True)
        ids = [list(row) for row in encoded["input_ids"]]
        masks = []
        for offsets, start in zip(encoded["offset_mapping"], answer_starts):
            masks.append([(end > start) or (begin == end and begin > start) for begin, end in offsets])
        return ids, masks
    if method == "prefix":
        ids = [list(row) for row in tokenizer(list(texts))["input_ids"]]
        prefixes = tokenizer([text[:start] for text, start in zip(texts, answer_starts)])["input_ids"]
        masks = []
        for row, prefix in zip(ids, prefixes):
            keep = _common_prefix_length(row, prefix)
            masks.append([i >= keep for i in range(len(row))])
        return ids, masks
    raise ValueError(f"unknown label method {method!r}; use auto, offsets or prefix")


def labels_from_mask(input_ids: Sequence[int], answer_mask: Sequence[bool], never_label: set[int]) -> list[int]:
    """Labels for one row: the id where ``answer_mask`` holds, ``IGNORE_INDEX`` elsewhere.

    Ids in ``never_label`` (BOS, ``<image>``, pad) are ignored even inside the answer span.
    """
    return [tok if (keep and tok not in never_label) else IGNORE_INDEX for tok, keep in zip(input_ids, answer_mask)]

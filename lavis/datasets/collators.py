"""Collators: dataset items -> Flamingo model inputs (``vision_x``, ``lang_x``, masks, labels).

One collator per task. The ``train`` role builds prompt + answer text, labels only the answer
(see :mod:`lavis.datasets.prompts`) and pads on the right; the ``eval`` role builds the query
prompt, preceded by the few-shot demonstrations of ``item["demos"]`` in training format, and pads on
the left so that generation continues every row from its last real token.

Images: ``vision_x`` is ``(B, T_img, 1, C, H, W)`` with a row's demonstration images first, in
demo order, and its query image last, matching the order of the ``<image>`` tokens in its text.

Truncation (``max_length`` in tokens, None = never):
- train: the text is cut on the right; a sample left with no answer token is a DataError.
- eval: whole demonstrations are dropped, oldest first, each with its image (cutting tokens would
  break the pairing of ``<image>`` tokens and images); rows that end up with fewer images get
  all-zero trailing images, which Flamingo never attends (text after a row's last ``<image>`` sees
  no image). The number of demonstrations kept per row is returned as ``num_demos``. A query that
  does not fit on its own is a DataError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lavis.common.errors import ConfigError, DataError
from lavis.common.special_tokens import END_OF_CHUNK, MEDIA_TOKEN
from lavis.datasets.prompts import (
    CAPTION_TEMPLATE,
    DEMOS_KEY,
    IGNORE_INDEX,
    TEXT_ONLY_DEMOS_KEY,
    VQA_TEMPLATE,
    LabelMethod,
    PromptTemplate,
    answer_token_mask,
    check_text_field,
    labels_from_mask,
    resolve_template,
    special_token_id,
    strip_media,
)

Role = Literal["train", "eval"]
PAD_HINT = "<PAD> with tokenizer.add_special_tokens({'pad_token': '<PAD>'})"


def pad_sequences(rows: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    """A (len(rows), longest) LongTensor of ``rows`` padded with ``value`` on ``side``."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if side == "right":
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        else:
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


def stack_images(rows: Sequence[Sequence[torch.Tensor]], samples: Sequence[str]) -> torch.Tensor:
    """``vision_x`` (B, T_img, 1, C, H, W) from per-row image lists; short rows get zero images at the end."""
    shapes = {tuple(img.shape) for row in rows for img in row}
    if len(shapes) != 1:
        raise DataError(
            f"images of one batch must share one (C, H, W) shape, got {sorted(shapes)} in samples {', '.join(samples)}"
        )
    (shape,) = shapes
    if len(shape) != 3:
        raise DataError(f"item['image'] must be a processed (C, H, W) tensor, got shape {shape} ({samples[0]}...)")
    num_images = max(len(row) for row in rows)
    reference = rows[0][0]
    # empty + fill: zero-initialising the whole (often hundreds of MB) block first costs more than the copy.
    vision_x = torch.empty((len(rows), num_images, 1, *shape), dtype=reference.dtype)
    for i, row in enumerate(rows):
        torch.stack(row, out=vision_x[i, : len(row), 0])
        vision_x[i, len(row) :] = 0
    return vision_x


def prompt_length(batch: dict) -> int:
    """Real (unpadded) tokens of a one-row eval batch."""
    return int(batch["attention_mask"].sum())


class Collator:
    """``items -> batch``: what a task's ``collator(model, role)`` returns.

    Length bucketing (:mod:`lavis.runners.eval_batches`) also asks an eval collator for each item's prompt
    length. The default collates each item alone; a collator that can tokenise without images overrides it.
    """

    def __call__(self, items: Sequence[dict]) -> dict:
        raise NotImplementedError

    def prompt_lengths(self, items: Sequence[dict]) -> list[int]:
        """Tokens of each eval item's prompt, as ``self([item])`` would give them."""
        return [prompt_length(self([item])) for item in items]


class FlamingoCollator(Collator):
    """What the caption and VQA collators share; subclasses say how an item fills the template.

    Args:
        tokenizer: HF tokenizer with ``<|endofchunk|>``, ``<image>`` and a pad token (``<PAD>``).
        role: ``train`` (labels, right padding) or ``eval`` (query prompt, left padding).
        prompt: template override: a :class:`PromptTemplate`, the prompt text, or a mapping with
            ``prompt`` / ``answer`` keys.
        max_length: token limit per row (None = no truncation); see the module docstring.
        padding_side: override of the role's padding side.
        label_method: how the answer tokens are found (see ``answer_token_mask``).
    """

    default_template: PromptTemplate
    id_keys: tuple[str, ...] = ()

    def __init__(
        self,
        tokenizer,
        role: Role = "train",
        prompt=None,
        max_length: int | None = None,
        padding_side: Literal["left", "right"] | None = None,
        label_method: LabelMethod = "auto",
        demo_separator: str = "",
    ):
        if role not in ("train", "eval"):
            raise ConfigError(f"collator role must be 'train' or 'eval', got {role!r}")
        if max_length is not None and max_length < 2:
            raise ConfigError(f"collator max_length must be at least 2 tokens or None, got {max_length}")
        if padding_side not in (None, "left", "right"):
            raise ConfigError(f"collator padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.role = role
        self.template = resolve_template(prompt, self.default_template)
        self.max_length = max_length
        self.padding_side = padding_side or ("right" if role == "train" else "left")
        self.label_method = label_method
        # Text after each demonstration (OpenFlamingo v2's captioning and VQA prompts: "\n").
        self.demo_separator = demo_separator
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"the tokenizer has no pad token; add {PAD_HINT}")
        self.media_token_id = special_token_id(tokenizer, MEDIA_TOKEN)
        self.end_of_chunk_id = special_token_id(tokenizer, END_OF_CHUNK)
        self.never_label = {self.media_token_id, tokenizer.pad_token_id}
        if tokenizer.bos_token_id is not None:
            self.never_label.add(tokenizer.bos_token_id)

    # --- what subclasses define -------------------------------------------------------------
    def template_fields(self, item: dict, sample: str, as_demo: bool) -> dict[str, str]:
        """The template fields of ``item`` (with the target field unless it is an eval query)."""
        raise NotImplementedError

    def eval_fields(self, items: Sequence[dict]) -> dict:
        """Raw per-sample fields an eval batch carries for the task (besides the ids)."""
        return {}

    # --- shared machinery -------------------------------------------------------------------
    def describe(self, item: dict) -> str:
        """``image_id=42``-style name of a sample for error messages."""
        for key in self.id_keys:
            if key in item:
                return f"{key}={item[key]}"
        return "sample without id"

    def demo_texts(self, item: dict) -> tuple[list[str], bool]:
        """Training-format text of each demonstration of ``item`` and whether they are text-only."""
        demos = item.get(DEMOS_KEY) or []
        text_only = bool(item.get(TEXT_ONLY_DEMOS_KEY, False))
        texts = []
        for demo in demos:
            text, _ = self.template.training(**self.template_fields(demo, f"demo {self.describe(demo)}", True))
            texts.append((strip_media(text) if text_only else text) + self.demo_separator)
        return texts, text_only

    def row_images(self, item: dict, text_only: bool, sample: str) -> list[torch.Tensor]:
        """Demonstration images (in demo order) then the query image."""
        demos = [] if text_only else (item.get(DEMOS_KEY) or [])
        images = []
        for owner, name in [(d, f"demo {self.describe(d)} of {sample}") for d in demos] + [(item, sample)]:
            image = owner.get("image")
            if not isinstance(image, torch.Tensor):
                raise DataError(f"{name}: item['image'] must be a processed image tensor, got {type(image).__name__}")
            images.append(image)
        return images

    def __call__(self, items: Sequence[dict]) -> dict:
        """The batch dict of ``items`` (see the module docstring)."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        samples = [self.describe(item) for item in items]
        shots = {len(item.get(DEMOS_KEY) or []) for item in items}
        # Training rows may hold different numbers of demonstrations (in-context training): short rows get
        # zero images after their last real one, which no <image> token refers to, so none is attended.
        if len(shots) > 1 and self.role == "eval":
            raise DataError(f"items of one batch must have the same number of demos, got {sorted(shots)}: {samples}")
        demos, text_only = zip(*(self.demo_texts(item) for item in items))
        if len(set(text_only)) > 1:
            raise DataError(f"a batch mixes text-only and image demonstrations: {samples}")
        if self.role == "train":
            batch, kept = self._train_text(items, demos, samples), [len(d) for d in demos]
        else:
            batch, kept = self._eval_text(items, demos, samples)
        images = []
        for item, sample, n_kept, n_all in zip(items, samples, kept, map(len, demos)):
            row = self.row_images(item, text_only[0], sample)
            # Truncation drops the oldest demonstrations, so their images go with them.
            images.append(row if text_only[0] else row[n_all - n_kept :])
        batch["vision_x"] = stack_images(images, samples)
        for key in self.id_keys:
            if all(key in item for item in items):
                batch[key] = [item[key] for item in items]
        if self.role == "eval":
            batch["num_demos"] = kept
            batch.update(self.eval_fields(items))
        return batch

    def _train_text(self, items, demos, samples) -> dict:
        texts, starts = [], []
        for item, demo_texts, sample in zip(items, demos, samples):
            context = "".join(demo_texts)
            text, answer_start = self.template.training(**self.template_fields(item, sample, False))
            texts.append(context + text)
            starts.append(len(context) + answer_start)
        ids, masks = answer_token_mask(self.tokenizer, texts, starts, self.label_method)
        labels = [labels_from_mask(row, mask, self.never_label) for row, mask in zip(ids, masks)]
        if self.max_length is not None:
            ids = [row[: self.max_length] for row in ids]
            labels = [row[: self.max_length] for row in labels]
            for row, sample in zip(labels, samples):
                if all(tok == IGNORE_INDEX for tok in row):
                    raise DataError(
                        f"{sample}: its prompt fills max_length={self.max_length} tokens, so no answer token "
                        "is left to learn; raise the collator's max_length"
                    )
        return {
            "lang_x": pad_sequences(ids, self.tokenizer.pad_token_id, self.padding_side),
            "attention_mask": pad_sequences([[1] * len(row) for row in ids], 0, self.padding_side),
            "labels": pad_sequences(labels, IGNORE_INDEX, self.padding_side),
        }

    def prompt_lengths(self, items: Sequence[dict]) -> list[int]:
        """Tokens of each eval item's prompt, as ``self([item])`` would give them, without collating images
        (prompts are tokenised and truncated row by row, so the lengths do not depend on the other items)."""
        if self.role != "eval":
            raise ValueError("prompt_lengths is for eval collators (query prompts)")
        demos = [self.demo_texts(item)[0] for item in items]
        _, ids, _ = self._eval_ids(items, demos, [self.describe(item) for item in items])
        return [len(row) for row in ids]

    def _eval_text(self, items, demos, samples) -> tuple[dict, list[int]]:
        prompts, ids, kept = self._eval_ids(items, demos, samples)
        batch = {
            "lang_x": pad_sequences(ids, self.tokenizer.pad_token_id, self.padding_side),
            "attention_mask": pad_sequences([[1] * len(row) for row in ids], 0, self.padding_side),
            "prompt": prompts,
        }
        return batch, kept

    def _eval_ids(self, items, demos, samples) -> tuple[list[str], list[list[int]], list[int]]:
        """(prompt, token ids, demonstrations kept) of each row, the oldest demonstrations dropped to fit."""
        queries = [self.template.query(**self.template_fields(item, s, False)) for item, s in zip(items, samples)]
        kept = [len(d) for d in demos]
        prompts = ["".join(d) + q for d, q in zip(demos, queries)]
        ids = [list(row) for row in self.tokenizer(prompts)["input_ids"]]
        if self.max_length is not None:
            for i, (row_demos, query) in enumerate(zip(demos, queries)):
                while len(ids[i]) > self.max_length:
                    if kept[i] == 0:
                        raise DataError(
                            f"{samples[i]}: the query prompt alone is {len(ids[i])} tokens, more than "
                            f"max_length={self.max_length}"
                        )
                    kept[i] -= 1
                    prompts[i] = "".join(row_demos[len(row_demos) - kept[i] :]) + query
                    ids[i] = list(self.tokenizer(prompts[i])["input_ids"])
        return prompts, ids, kept


class CaptionCollator(FlamingoCollator):
    """Captioning: ``<image>Output:{caption}<|endofchunk|>``; the caption is ``item["text_input"]``.

    Eval batches carry ``image_id``, ``prompt``, ``num_demos`` and ``captions`` (the reference
    captions, when the items have them); train batches ``image_id``.
    """

    default_template = CAPTION_TEMPLATE
    id_keys = ("image_id",)

    def template_fields(self, item, sample, as_demo):
        if self.role == "eval" and not as_demo:
            return {}
        if as_demo and "text_input" not in item and item.get("captions"):
            # A demo drawn from an eval-role split (one item per image, as evaluate.py builds every split):
            # OpenFlamingo's evaluation shows each demo image with its first reference caption.
            return {"caption": check_text_field(item["captions"][0], "captions[0]", sample)}
        if "text_input" not in item:
            raise DataError(
                f"{sample}: a caption item needs 'text_input' (the caption) to be used for training or as a demo"
            )
        return {"caption": check_text_field(item["text_input"], "text_input", sample)}

    def eval_fields(self, items):
        if all("captions" in item for item in items):
            return {"captions": [list(item["captions"]) for item in items]}
        return {}


class VQACollator(FlamingoCollator):
    """VQA: ``<image>Question:{question} Short answer:{answer}<|endofchunk|>``.

    The question is ``item["text_input"]``; the training target is ``item["answer"]`` (the most
    frequent answer). ``demo_answer`` picks a demonstration's answer: ``"answer"`` (that same field,
    the default) or ``"first"`` (``answers[0]``, what OpenFlamingo's evaluation used).
    Eval batches carry ``question_id``, ``image_id``, ``text_input``, ``answers`` (when the items
    have them), ``prompt`` and ``num_demos``.
    """

    default_template = VQA_TEMPLATE
    id_keys = ("question_id", "image_id")

    def __init__(
        self, tokenizer, role: Role = "train", *, demo_answer: Literal["answer", "first"] = "answer", **kwargs
    ):
        if demo_answer not in ("answer", "first"):
            raise ConfigError(f"VQACollator demo_answer must be 'answer' or 'first', got {demo_answer!r}")
        self.demo_answer = demo_answer
        super().__init__(tokenizer, role, **kwargs)

    def template_fields(self, item, sample, as_demo):
        if "text_input" not in item:
            raise DataError(f"{sample}: a VQA item needs 'text_input' (the question)")
        fields = {"question": check_text_field(item["text_input"], "text_input", sample)}
        if self.role == "eval" and not as_demo:
            return fields
        if as_demo and self.demo_answer == "first":
            answers = item.get("answers") or []
            if not answers:
                raise DataError(f"{sample}: demo_answer='first' needs a non-empty 'answers' list")
            fields["answer"] = check_text_field(answers[0], "answers[0]", sample)
        else:
            if "answer" not in item:
                raise DataError(f"{sample}: a VQA item used for training or as a demo needs 'answer'")
            fields["answer"] = check_text_field(item["answer"], "answer", sample)
        return fields

    def eval_fields(self, items):
        out = {"text_input": [item["text_input"] for item in items]}
        if all("answers" in item for item in items):
            out["answers"] = [list(item["answers"]) for item in items]
        return out

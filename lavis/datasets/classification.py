"""Rank classification samples (Hateful Memes, ImageNet): the sample format and the collator.

An item is ``{"image", "id", "image_id", "label", "class_name", "text_input"}``: ``label`` is the index of
the GT class in the task's class list, ``class_name`` its name (the target of a demonstration) and
``text_input`` the text shown with the image (Hateful Memes' OCR text; empty for ImageNet).

The collator builds OpenFlamingo v2's prompts: each demonstration is the chunk with its class name
(``<image>Output:{class_name}<|endofchunk|>``), the query the prompt alone; the task then scores every
class name as a continuation of the query (``model.score``).
"""

from __future__ import annotations

import torch

from lavis.common.errors import DataError
from lavis.datasets.collators import FlamingoCollator
from lavis.datasets.prompts import DEMOS_KEY, PromptTemplate, check_text_field
from lavis.datasets.samples import SampleFormat


def _classification_item(record: dict, image: torch.Tensor, text) -> dict:
    return {
        "image": image,
        "id": record["id"],
        "image_id": record["image_id"],
        "label": record["label"],
        "class_name": record["class_name"],
        "text_input": text(record["text"]) if record.get("text") else "",
        "class_set": record["class_set"],  # the builder's name: which class list and prompt the task uses
    }


CLASSIFICATION = SampleFormat("classification", "id", _classification_item)

# OpenFlamingo v2's prompts (eval/models/open_flamingo.py); no "\n" between classification demos.
HATEFUL_MEMES_TEMPLATE = PromptTemplate(
    "<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:",
    "{class_name}<|endofchunk|>",
    target="class_name",
    prompt_fields=("ocr",),
)
IMAGENET_TEMPLATE = PromptTemplate("<image>Output:", "{class_name}<|endofchunk|>", target="class_name")


class ClassificationCollator(FlamingoCollator):
    """Rank classification prompts. Eval batches carry ``id``, ``image_id``, ``label``, ``prompt``, ``num_demos``.

    The template decides what is shown: ``{ocr}`` (Hateful Memes) is the item's ``text_input``.
    """

    default_template = IMAGENET_TEMPLATE
    id_keys = ("id", "image_id")

    def template_fields(self, item, sample, as_demo):
        fields = {}
        if "ocr" in self.template.prompt_fields:
            fields["ocr"] = check_text_field(item.get("text_input", ""), "text_input", sample)
        if self.role == "eval" and not as_demo:
            return fields
        if "class_name" not in item:
            raise DataError(f"{sample}: a classification item used for training or as a demo needs 'class_name'")
        fields["class_name"] = check_text_field(item["class_name"], "class_name", sample)
        return fields

    def __init__(
        self,
        tokenizer,
        role="eval",
        *,
        templates: dict | None = None,
        compat_zero_shot: bool = False,
        permutations: int = 1,
        **kwargs,
    ):
        super().__init__(tokenizer, role, **kwargs)
        self.templates = dict(templates or {})
        self.compat_zero_shot = compat_zero_shot
        self.permutations = permutations

    def _use_template_of(self, items) -> str:
        """The one class set of ``items``; its template becomes the one prompts are rendered with."""
        sets = {item.get("class_set") for item in items}
        if len(sets) > 1:
            raise DataError(f"a classification batch mixes class sets {sorted(map(str, sets))}")
        (class_set,) = sets
        if class_set in self.templates:
            self.template = self.templates[class_set]
        return class_set

    def prompt_lengths(self, items):
        # Length bucketing asks before any batch is collated: the items' template first (Hateful Memes' OCR
        # prompt is longer than the default ImageNet one).
        self._use_template_of(items)
        return super().prompt_lengths(items)

    def __call__(self, items):
        """The batch of ``items``; with ``permutations > 1`` also ``views``: the batch again with each row's
        demonstrations in other orders (prompt ensembling)."""
        class_set = self._use_template_of(items)
        batch = super().__call__(items)
        batch["class_set"] = [class_set] * len(items)
        if self.permutations > 1 and self.role == "eval":
            orders = [demo_orders(len(item.get(DEMOS_KEY) or []), self.permutations, item["id"]) for item in items]
            batch["views"] = [
                super(ClassificationCollator, self).__call__(
                    [
                        dict(item, **{DEMOS_KEY: [item[DEMOS_KEY][j] for j in order[v]]})
                        if item.get(DEMOS_KEY)
                        else item
                        for item, order in zip(items, orders)
                    ]
                )
                for v in range(1, min(len(o) for o in orders))
            ]
        return batch

    def row_images(self, item, text_only, sample):
        if text_only and self.compat_zero_shot and item.get(DEMOS_KEY):
            # OpenFlamingo v2's 0-shot classification: the demo images are passed but their <image> tags
            # stripped, so the query's only <image> token attends the first demonstration's image.
            image = item[DEMOS_KEY][0]["image"]
            if image is None:
                raise DataError(
                    f"{sample}: the v2 0-shot compatibility mode needs the text-only demonstrations' images; "
                    "build the FewShotDataset with text_demos_keep_images=task.text_demos_keep_images"
                )
            return [image]
        return super().row_images(item, text_only, sample)

    def eval_fields(self, items):
        return {"label": [int(item["label"]) for item in items]}


def demo_orders(num_demos: int, count: int, sample_id) -> list[list[int]]:
    """Up to ``count`` distinct orders of ``num_demos`` demonstrations: the drawn order first, then seeded
    shuffles (OpenFlamingo shuffles the demos once per ensembling pass)."""
    import math
    import random

    wanted = min(count, math.factorial(num_demos))
    orders = [list(range(num_demos))]
    rng = random.Random(f"prompt-ensembling/{sample_id}")
    while len(orders) < wanted:
        order = list(range(num_demos))
        rng.shuffle(order)
        if order not in orders:
            orders.append(order)
    return orders

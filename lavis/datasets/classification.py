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
from lavis.datasets.base import SampleFormat
from lavis.datasets.collators import FlamingoCollator
from lavis.datasets.prompts import PromptTemplate, check_text_field


def _classification_item(record: dict, image: torch.Tensor, text) -> dict:
    return {
        "image": image,
        "id": record["id"],
        "image_id": record["image_id"],
        "label": record["label"],
        "class_name": record["class_name"],
        "text_input": text(record["text"]) if record.get("text") else "",
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

    def eval_fields(self, items):
        return {"label": [int(item["label"]) for item in items]}

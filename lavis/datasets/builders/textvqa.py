"""TextVQA in the VQA format OpenFlamingo ships
(``eval/data/textvqa/{train,val}_{questions,annotations}_vqa_format.json``):
``image_id`` is TextVQA's image id and the file ``train_images/{image_id}.jpg`` (val images are in train_images
too); answers carry ``answer_id``, there is no ``answer_type`` and ``question_type`` is "none of the above".

The files, the join and the bad-data errors are those of ``vqav2`` (lavis/datasets/builders/vqav2.py); only
the defaults differ (lavis/configs/datasets/textvqa/defaults.yaml).
"""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.datasets.builders.vqav2 import VQAv2Builder


@registry.register_builder("textvqa")
class TextVQABuilder(VQAv2Builder):
    """The textvqa questions joined with their annotations (see the module docstring)."""

    name = "textvqa"

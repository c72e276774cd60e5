"""VizWiz in the VQA format OpenFlamingo ships
(``eval/data/vizwiz/{train,val}_{questions,annotations}_vqa_format.json``):
``image_id`` is the image's file name (``VizWiz_val_00000002.jpg``), the answers ``{answer, answer_confidence}`` carry
no ``answer_id`` and may be "unanswerable", and ``question_type`` is VizWiz's answer type.

The files, the join and the bad-data errors are those of ``vqav2`` (lavis/datasets/builders/vqav2.py); only
the defaults differ (lavis/configs/datasets/vizwiz/defaults.yaml).
"""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.datasets.builders.vqav2 import VQAv2Builder


@registry.register_builder("vizwiz")
class VizWizBuilder(VQAv2Builder):
    """The vizwiz questions joined with their annotations (see the module docstring)."""

    name = "vizwiz"

"""OK-VQA v1.1: the official files ``OpenEnded_mscoco_{train,val}2014_questions.json`` and
``mscoco_{train,val}2014_annotations.json``
over COCO 2014 images (``COCO_{data_subtype}_{image_id:012d}.jpg``). Its GT ``answer`` fields are already
stemmed; the task stems the prediction (``run.vqa_stemmer: okvqa``); OpenFlamingo evaluates val2014.

The files, the join and the bad-data errors are those of ``vqav2`` (lavis/datasets/builders/vqav2.py); only
the defaults differ (lavis/configs/datasets/okvqa/defaults.yaml).
"""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.datasets.builders.vqav2 import VQAv2Builder


@registry.register_builder("okvqa")
class OKVQABuilder(VQAv2Builder):
    """The okvqa questions joined with their annotations (see the module docstring)."""

    name = "okvqa"

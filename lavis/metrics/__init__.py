"""Evaluation metrics: the official VQAv2 accuracy and the COCO caption metrics (pycocoevalcap).

The metrics live in their modules (``lavis.metrics.vqa.vqa_accuracy``, ``lavis.metrics.caption.caption_metrics``,
...); this package holds the record checks and the results writing they share.
"""

from __future__ import annotations

import os
from typing import Any

from lavis.common.errors import DataError
from lavis.common.fileio import atomic_write_json


def record_field(rec: Any, name: str, types: type | tuple, label: str, index: int) -> Any:
    """``rec[name]`` checked for type; otherwise a DataError naming the file (``label``), record and field."""
    if not isinstance(rec, dict):
        raise DataError(f"{label}: record #{index} is not an object: {rec!r:.120}")
    if name not in rec:
        raise DataError(f"{label}: record #{index} has no '{name}' field: {rec!r:.200}")
    value = rec[name]
    # bool is an int subclass, but True is never a valid id.
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(
            f"{label}: record #{index} field '{name}' has the wrong type ({type(value).__name__}): {value!r:.120}"
        )
    return value


def write_submission(
    records: list[dict], path: str | os.PathLike, id_field: str, id_types: type | tuple, text_field: str, what: str
) -> None:
    """Write ``[{id_field, text_field}]`` (an official results format) atomically; extra keys are dropped.

    A missing field, a wrong type or a repeated id raises DataError naming ``what``, the path and the record.
    """
    label = f"{what} to write to {os.fspath(path)}"
    seen: set = set()
    out = []
    for i, rec in enumerate(records):
        sample_id = record_field(rec, id_field, id_types, label, i)
        text = record_field(rec, text_field, str, label, i)
        if sample_id in seen:
            raise DataError(f"{label}: duplicate {id_field} {sample_id!r} (record #{i})")
        seen.add(sample_id)
        out.append({id_field: sample_id, text_field: text})
    atomic_write_json(path, out)

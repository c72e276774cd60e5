"""Evaluation metrics: the official VQAv2 accuracy and the COCO caption metrics (pycocoevalcap).

Public API (imported lazily, so that ``python -m lavis.metrics.vqa`` does not import the module twice):
``vqa_accuracy``, ``write_vqa_results``, ``caption_metrics``, ``write_caption_results``.
This module also holds the JSON reading / atomic writing shared by both metrics.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from lavis.common.errors import DataError

__all__ = [
    "vqa_accuracy",
    "write_vqa_results",
    "caption_metrics",
    "write_caption_results",
    "read_json",
    "record_field",
    "write_json_atomic",
]

_LAZY = {
    "vqa_accuracy": "lavis.metrics.vqa",
    "write_vqa_results": "lavis.metrics.vqa",
    "caption_metrics": "lavis.metrics.caption",
    "write_caption_results": "lavis.metrics.caption",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lavis.metrics' has no attribute '{name}'")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file; a missing or malformed file is a DataError naming ``what`` and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {os.fspath(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} file {os.fspath(path)}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{what} file {os.fspath(path)} is not valid JSON: {e}") from None


def record_field(rec: Any, name: str, types: type | tuple, label: str, index: int) -> Any:
    """``rec[name]`` checked for type; otherwise a DataError naming the file (``label``), record and field."""
    if not isinstance(rec, dict):
        raise DataError(f"{label}: record #{index} is not an object: {rec!r:.120}")
    if name not in rec:
        raise DataError(f"{label}: record #{index} has no '{name}' field: {rec!r:.200}")
    value = rec[name]
    # bool is an int subclass, but True is never a valid id.
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{label}: record #{index} field '{name}' has the wrong type "
                        f"({type(value).__name__}): {value!r:.120}")
    return value


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers never see a half-written file.

    The data goes to a temporary file in the same directory, is fsynced, then renamed over ``path``
    (``os.replace`` is atomic on POSIX and Windows within one file system).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave the temporary file behind, whatever interrupted the write.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

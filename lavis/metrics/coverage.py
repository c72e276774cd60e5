"""The metric CLIs' coverage rule: a results file answers exactly the annotated samples, or says it is partial.

As the official tools (the VQA API's ``loadRes``, the COCO caption API) refuse a results file that
misses or adds ids, so do ``python -m lavis.metrics.vqa`` and ``python -m lavis.metrics.caption``:
a silently partial file would report a score on a subset as if it were the split's. ``--allow-partial``
scores the subset on purpose (and the CLI then prints how many were scored); ids that the annotations
do not have are refused either way.
"""

from __future__ import annotations

from lavis.common.errors import DataError
from lavis.common.fileio import read_json


def _ids(entries, key: str, label: str) -> list:
    if not isinstance(entries, list):
        raise DataError(f"{label}: expected a JSON list of records, got {type(entries).__name__}")
    ids = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or key not in entry:
            raise DataError(f"{label}: record #{i} has no {key!r}: {str(entry)[:80]}")
        ids.append(entry[key])
    return ids


def expected_ids(annotations_path: str, key: str) -> list:
    """Every sample id of an official annotation file (``images[].id`` for captions, else ``annotations[].key``)."""
    data = read_json(annotations_path, "annotations file")
    if not isinstance(data, dict):
        raise DataError(f"{annotations_path}: expected a JSON object (an official annotations file)")
    if key == "image_id" and isinstance(data.get("images"), list):
        return [image.get("id") for image in data["images"] if isinstance(image, dict)]
    return list(dict.fromkeys(_ids(data.get("annotations"), key, f"{annotations_path}: annotations")))


def check_coverage(results_path: str, annotations_path: str, key: str, allow_partial: bool) -> str:
    """A DataError (counts and a few ids) unless the results cover the annotated ids; the "scored" line."""
    wanted = expected_ids(annotations_path, key)
    given = _ids(read_json(results_path, "results file"), key, results_path)
    wanted_set, given_set = set(wanted), set(given)
    extra = [i for i in dict.fromkeys(given) if i not in wanted_set]
    missing = [i for i in wanted if i not in given_set]
    if extra:
        raise DataError(
            f"{results_path}: {len(extra)} {key}(s) are not in {annotations_path} (first: {extra[:5]}); "
            f"the results belong to another split or file"
        )
    if missing and not allow_partial:
        raise DataError(
            f"{results_path}: answers {len(given_set)} of the {len(wanted)} {key}s of {annotations_path}; "
            f"{len(missing)} missing (first: {missing[:5]}); pass --allow-partial to score the subset"
        )
    return f"scored {len(given_set)} of the {len(wanted)} {key}s of {annotations_path}"

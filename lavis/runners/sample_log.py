"""The per-sample log of an evaluation: ``samples_<dataset>_<split tag>.jsonl``, one JSON line per sample.

Fields follow lmms-eval's ``--log_samples`` output where it has them:

- ``doc_id``: the sample id (``image_id`` for captions, ``question_id`` for VQA, ...);
- ``input``: the prompt text the model saw (few-shot demonstrations included);
- ``target``: the references (captions) or the ground-truth answers;
- ``resps``: the raw generation, ``[[text]]`` (one list of responses per request, as lmms-eval);
- ``filtered_resps``: the post-processed prediction that was scored, ``[text]``;

plus ``image`` (the query image's file, when the data set has files), ``demo_ids`` (the sample ids of the
demonstrations, prompt order; pool indices when the pool has no files), ``demo_images`` (their files;
absent and ``demos_text_only: true`` for OpenFlamingo's text-only 0-shot demonstrations) and the per-sample
metric keys (``CIDEr``,
``vqa_accuracy``, ... as the task names them) and any other per-sample fields the task gives
(``question_type``, ``answer_type``, ...).

The split tag is the split for a training run's evaluation, with the step (``val_step120``), and
``<split>_<shots>shot_trial<k>`` for the few-shot evaluation. The file API is generic (records in, file
out: :func:`write_samples`, :func:`read_samples`); the rest of this module is the seam between the
distributed evaluation (lavis/runners/evaluation.py) and the tasks:

1. every eval batch's records get the batch's context of their row (:func:`annotate`: prompt and
   demonstration indices) before the records are gathered from the ranks;
2. ``task.evaluate`` may return, under :data:`SAMPLES_KEY`, ``{sample_id: {field: value}}`` with the
   per-sample score(s), ``target`` and ``filtered_resps`` (:func:`pop_samples` removes it from the
   metrics before they are logged or broadcast);
3. rank 0 joins the two into lmms-eval records (:func:`build_samples`) and writes them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lavis.common.errors import DataError
from lavis.common.fileio import atomic_write_text, read_json_lines
from lavis.datasets.collators import Collator
from lavis.datasets.fewshot import FewShotDataset
from lavis.datasets.samples import DatasetView, ImageDataset

# The key of task.evaluate's output that holds per-sample fields (never logged as a metric).
SAMPLES_KEY = "samples"
# The key under which annotate() stores a record's batch context (dropped by build_samples).
CONTEXT_KEY = "sample_context"
LMMS_FIELDS = ("doc_id", "input", "target", "resps", "filtered_resps")
_FEWSHOT_TAG = re.compile(r"^(?P<split>.+)_(?P<shots>\d+)shot_trial(?P<trial>\d+)$")
_STEP_TAG = re.compile(r"^(?P<split>.+)_step(?P<step>\d+)$")


def fewshot_tag(split: str, shots: int, trial: int) -> str:
    """The split tag of one few-shot pass: ``val_4shot_trial0``."""
    return f"{split}_{shots}shot_trial{trial}"


def step_tag(split: str, step: int) -> str:
    """The split tag of a training run's evaluation at ``step``: ``val_step120``."""
    return f"{split}_step{step}"


def samples_filename(dataset: str, tag: str) -> str:
    """``samples_<dataset>_<tag>.jsonl``."""
    return f"samples_{dataset}_{tag}.jsonl"


def parse_tag(tag: str) -> dict:
    """``{"split", "shots", "trial"}`` of a few-shot tag, ``{"split", "step"}`` of a step tag, else ``{"split"}``."""
    match = _FEWSHOT_TAG.match(tag)
    if match:
        return {"split": match["split"], "shots": int(match["shots"]), "trial": int(match["trial"])}
    match = _STEP_TAG.match(tag)
    if match:
        return {"split": match["split"], "step": int(match["step"])}
    return {"split": tag}


def parse_samples_filename(name: str, datasets: Iterable[str]) -> dict | None:
    """``{"dataset", "tag", "split", ...}`` of a samples file name, or None when it is not one.

    Dataset names may contain underscores, so the name is matched against the run's ``datasets``
    (longest first); an unknown dataset gives None.
    """
    if not (name.startswith("samples_") and name.endswith(".jsonl")):
        return None
    stem = name[len("samples_") : -len(".jsonl")]
    for dataset in sorted(datasets, key=len, reverse=True):
        if stem.startswith(dataset + "_"):
            tag = stem[len(dataset) + 1 :]
            return {"dataset": dataset, "tag": tag, **parse_tag(tag)}
    return None


def sample_record(
    doc_id: Any,
    *,
    input: str | None,
    target: Any,
    resps: str | None,
    filtered_resps: Any,
    image: str | None = None,
    demo_ids: list | None = None,
    **extra: Any,
) -> dict:
    """One line of a samples file, lmms-eval's fields first (see the module docstring).

    ``resps`` is the raw text (stored as ``[[resps]]``), ``filtered_resps`` the scored prediction (stored
    as ``[filtered_resps]``); ``extra`` holds the per-sample metric keys and other per-sample fields.
    """
    record = {
        "doc_id": doc_id,
        "input": input,
        "target": target,
        "resps": [[resps]] if resps is not None else [],
        "filtered_resps": [filtered_resps] if filtered_resps is not None else [],
        "image": image,
        "demo_ids": list(demo_ids or []),
    }
    record.update(extra)
    return record


def prediction(sample: dict) -> Any:
    """The scored prediction of a sample record (its first ``filtered_resps``), or None."""
    values = sample.get("filtered_resps") or []
    return values[0] if values else None


def raw_response(sample: dict) -> Any:
    """The raw generation of a sample record (its first ``resps``), or None."""
    values = sample.get("resps") or []
    first = values[0] if values else None
    return first[0] if isinstance(first, list) and first else first


def _finite(value: Any) -> Any:
    # Tensors and numpy values (``.tolist()``) become plain numbers and lists. JSON has no NaN/inf: a
    # non-finite score is written as null rather than as invalid JSON.
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_samples(path: str | os.PathLike, samples: Iterable[dict]) -> Path:
    """Write ``samples`` (dicts with a ``doc_id``, unique) as JSON lines to ``path``, atomically.

    A record without ``doc_id``, a repeated ``doc_id`` or a value JSON cannot hold raises DataError naming
    the record, before anything is written.
    """
    path = Path(path)
    lines, seen = [], {}
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or "doc_id" not in sample:
            raise DataError(f"sample log {path}: record #{i} has no 'doc_id': {sample!r:.200}")
        doc_id = sample["doc_id"]
        if doc_id in seen:
            raise DataError(f"sample log {path}: duplicate doc_id {doc_id!r} in records #{seen[doc_id]} and #{i}")
        seen[doc_id] = i
        try:
            lines.append(json.dumps(_finite(sample), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise DataError(f"sample log {path}: record #{i} (doc_id {doc_id!r}) is not JSON: {err}") from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def read_samples(path: str | os.PathLike) -> list[dict]:
    """The records of a samples file; DataError naming the file and line when one is not a JSON object."""
    samples = []
    for number, sample in read_json_lines(path, "sample log"):
        if not isinstance(sample, dict) or "doc_id" not in sample:
            raise DataError(f"{path}:{number}: expected an object with a 'doc_id'")
        samples.append(sample)
    return samples


# --- the seam with the distributed evaluation ------------------------------------------------------------


def annotate(records: list[dict], batch: dict, key: str) -> list[dict]:
    """``records`` (one per batch row, keyed by ``key``) with their row's prompt and demonstration indices.

    Rows are matched by sample id when the batch carries the ids, else by position. The context travels
    with the record through the gather, so rank 0 knows every rank's prompts.
    """
    prompts = batch.get("prompt")
    demos = batch.get("demo_indices")
    text_only = batch.get("demos_text_only")
    if prompts is None and demos is None:
        return records
    ids = batch.get(key)
    row_of = {sample_id: i for i, sample_id in enumerate(ids)} if ids is not None else None
    for position, record in enumerate(records):
        row = row_of.get(record.get(key), position) if row_of is not None else position
        context = {}
        if prompts is not None and row < len(prompts):
            context["input"] = prompts[row]
        if demos is not None and row < len(demos):
            context["demo_indices"] = list(demos[row])
        if text_only is not None and row < len(text_only) and text_only[row]:
            context["demos_text_only"] = True
        record[CONTEXT_KEY] = context
    return records


class DemoIndexCollator(Collator):
    """An eval collator that also passes each item's ``demo_indices`` (few-shot) into the batch.

    The collators drop the oldest demonstrations when a prompt is too long (``num_demos`` says how many
    were kept), so only the last ``num_demos`` indices of a row are kept here.
    """

    def __init__(self, collator):
        self.collator = collator

    def prompt_lengths(self, items: list[dict]) -> list[int]:
        # A task's collator may be any callable; a Collator can tell the lengths without collating images.
        if isinstance(self.collator, Collator):
            return self.collator.prompt_lengths(items)
        return super().prompt_lengths(items)

    def __call__(self, items: list[dict]) -> dict:
        from lavis.datasets.prompts import TEXT_ONLY_DEMOS_KEY

        batch = self.collator(items)
        if any(item.get(TEXT_ONLY_DEMOS_KEY) for item in items):
            # OpenFlamingo's 0-shot prompt: demonstration texts without their images.
            batch["demos_text_only"] = [bool(item.get(TEXT_ONLY_DEMOS_KEY)) for item in items]
        if any("demo_indices" in item for item in items):
            kept = batch.get("num_demos") or [len(item.get("demo_indices", [])) for item in items]
            batch["demo_indices"] = [
                list(item.get("demo_indices", []))[len(item.get("demo_indices", [])) - n :] if n else []
                for item, n in zip(items, kept)
            ]
        return batch


def pop_samples(metrics: dict) -> dict:
    """Remove and return the per-sample fields (:data:`SAMPLES_KEY`) of ``task.evaluate``'s output."""
    samples = metrics.pop(SAMPLES_KEY, None) if isinstance(metrics, dict) else None
    return samples or {}


def _image_files(dataset) -> tuple[Any, dict | None, list | None]:
    """``(image dataset, {sample_id: image file}, [image file per index])`` of a (wrapped) dataset."""
    # Unwrap FewShotDataset, QuerySubset and InContextTrainingDataset (views); a data set that is not built
    # from image files (webdataset shards) has no files to name.
    while isinstance(dataset, DatasetView):
        dataset = dataset.base
    if not isinstance(dataset, ImageDataset):
        return dataset, None, None
    files = [r.get("image_path") for r in dataset.records]
    by_id = {r[dataset.sample_id_key]: r.get("image_path") for r in dataset.records}
    return dataset, by_id, files


def _pool_files(dataset) -> tuple[list | None, list | None]:
    """``([image file per pool index], [sample id per pool index])`` of a few-shot dataset's demo pool."""
    if not isinstance(dataset, FewShotDataset):
        return None, None
    inner, _, files = _image_files(dataset.pool_ds)
    if files is None:
        return None, None
    return [str(f) if f is not None else None for f in files], [r[inner.sample_id_key] for r in inner.records]


def build_samples(
    records: list[dict], key: str, per_sample: dict, dataset, prediction_keys=("caption", "answer")
) -> list[dict]:
    """lmms-eval records of one evaluated split from its (de-duplicated, annotated) task records, in the
    order of ``dataset.sample_ids()``.

    ``per_sample``: ``task.evaluate``'s :data:`SAMPLES_KEY` (``target``, ``filtered_resps`` and scores by
    sample id); a record's ``resps`` is its raw generation. Without ``filtered_resps`` from the task, the
    record's own prediction field (one of ``prediction_keys``) is used.
    """
    _, image_by_id, _ = _image_files(dataset)
    pool_files, pool_ids = _pool_files(dataset)
    # The split's own order, whatever the number of ranks the records were gathered from.
    order = {sample_id: i for i, sample_id in enumerate(dataset.sample_ids())}
    records = sorted(records, key=lambda r: order.get(r[key], len(order)))
    samples = []
    for record in records:
        sample_id = record[key]
        context = record.get(CONTEXT_KEY) or {}
        # The task's per-sample fields win over the record's own fields of the same name.
        fields = {k: v for k, v in record.items() if k not in (key, CONTEXT_KEY)}
        fields.update(per_sample.get(sample_id) or per_sample.get(str(sample_id)) or {})
        predicted = [fields.pop(k) for k in prediction_keys if k in fields]
        filtered = fields.pop("filtered_resps") if "filtered_resps" in fields else next(iter(predicted), None)
        prompt = fields.pop("input", None)
        demo_indices = context.get("demo_indices") or []
        if context.get("demos_text_only"):
            fields["demos_text_only"] = True  # the prompt shows these demonstrations' texts, not their images
        elif pool_ids is not None:
            fields["demo_images"] = [pool_files[j] for j in demo_indices]
        image = fields.pop("image", None) or (image_by_id.get(sample_id) if image_by_id else None)
        fields.pop("doc_id", None)
        fields.pop("demo_ids", None)
        samples.append(
            sample_record(
                sample_id,
                input=context.get("input", prompt),
                target=fields.pop("target", None),
                resps=fields.pop("resps", None),
                filtered_resps=filtered,
                image=str(image) if image is not None else None,
                demo_ids=[pool_ids[j] for j in demo_indices] if pool_ids is not None else demo_indices,
                **fields,
            )
        )
    return samples

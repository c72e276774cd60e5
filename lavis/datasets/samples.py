"""Dataset classes: records read by a builder, turned into model-ready items.

A builder reads annotation files into *records* (plain dicts, checked up front)
and hands them to one of these classes together with its processors. The
dataset decodes the image and applies the processors when an item is asked
for. Items follow CONTRACTS.dev.md:

- caption train: ``{"image", "text_input", "image_id"}`` (one per image and caption)
- caption eval:  ``{"image", "image_id", "captions"}`` (one per image; ``captions`` are the
  references, handy for few-shot demonstrations; scoring reads ``annotation_file``)
- vqa:           ``{"image", "text_input", "answers", "answer", "question_id", "image_id"}``

Bad samples (an image that cannot be decoded while training) follow
``on_bad_sample``: ``error`` raises a DataError naming the file and record;
``skip`` logs the sample, adds one to ``num_skipped`` and returns another
sample chosen deterministically (the next index), so an epoch never silently
has fewer samples. ``num_skipped`` is shared with DataLoader worker processes.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lavis.common.errors import DataError

logger = logging.getLogger(__name__)

# How many consecutive replacements a skip may try before the data is declared broken.
MAX_CONSECUTIVE_BAD = 100


class BadSample(Exception):
    """An image or record that cannot be turned into an item (internal; becomes DataError or a skip)."""


def decode_image(source: str | Path | bytes, where: str) -> Image.Image:
    """An RGB PIL image from a path or encoded bytes; BadSample naming ``where`` when unreadable."""
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with handle:
            image = Image.open(handle)
            image.load()  # decode now, inside the try, not lazily in the processor
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadSample(f"{where}: cannot read image: {err}") from err


class SkipCounter:
    """A count of skipped samples shared by the main process and DataLoader workers.

    A plain attribute would be incremented in the worker's copy and lost; a
    shared-memory integer is visible to the process that owns the dataset. The
    count is per rank: the runner sums it over ranks (all_reduce) before logging
    it as ``data/num_skipped`` in metrics.jsonl.
    """

    def __init__(self):
        self._value = multiprocessing.get_context().Value("q", 0)

    def add(self, n: int = 1) -> None:
        """Add ``n`` skipped samples."""
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        """The number of samples skipped so far in this process and its workers."""
        return int(self._value.value)


@dataclass(frozen=True)
class SampleFormat:
    """How a record plus a processed image becomes an item, for one kind of split."""

    name: str
    sample_id_key: str
    make_item: Callable[[dict, torch.Tensor, Callable[[str], str]], dict]


def _caption_train_item(record: dict, image: torch.Tensor, text: Callable[[str], str]) -> dict:
    return {"image": image, "text_input": text(record["caption"]), "image_id": record["image_id"]}


def _caption_eval_item(record: dict, image: torch.Tensor, text: Callable[[str], str]) -> dict:
    return {"image": image, "image_id": record["image_id"], "captions": [text(c) for c in record["captions"]]}


def _vqa_item(record: dict, image: torch.Tensor, text: Callable[[str], str]) -> dict:
    return {
        "image": image,
        "text_input": text(record["question"]),
        "answers": list(record["answers"]),
        "answer": record["answer"],
        "question_id": record["question_id"],
        "image_id": record["image_id"],
    }


CAPTION_TRAIN = SampleFormat("caption_train", "image_id", _caption_train_item)
CAPTION_EVAL = SampleFormat("caption_eval", "image_id", _caption_eval_item)
VQA = SampleFormat("vqa", "question_id", _vqa_item)


def describe_record(record: dict) -> str:
    """The ids of a record, for messages: ``image_id=5 question_id=50``."""
    keys = ("image_id", "question_id")
    return " ".join(f"{k}={record[k]}" for k in keys if k in record)


class SplitDataset(torch.utils.data.Dataset):
    """The dataset contract: what the runner, evaluation and the tasks read from the dataset of one split.

    Every dataset handed to the runner is one (the runner checks at start-up, ``check_split_datasets``);
    a subclass sets ``sample_id_key`` and implements ``sample_ids()`` and the torch Dataset protocol.
    """

    #: The item key that identifies a sample ("image_id", "question_id", "id"); records are keyed by it.
    sample_id_key: str
    #: Ground-truth files used for scoring (caption: COCO-style captions; vqa: annotations and questions).
    annotation_file: str | None = None
    question_file: str | None = None
    #: Items served by a replacement because they could not be read (summed over ranks, logged).
    num_skipped: int = 0
    #: How a stream's records split over ranks: "pad" (equal lengths) or "exact" (ShardDataset's
    #: webdataset.uneven); a map-style dataset is split by the runner's sampler.
    uneven: str = "pad"
    #: How records become items, for datasets built from records (None for any other dataset).
    sample_format: SampleFormat | None = None

    def sample_ids(self) -> list:
        """Every sample id of the split, in index order (the coverage check of evaluation)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_ids()")

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch; a stream orders itself by it, a map-style dataset (ordered by the
        runner's sampler) ignores it."""

    def text_item(self, index: int) -> dict:
        """The item of ``index`` without reading its image (``"image"`` is None): the ids and text that a
        text-only demonstration shows. Here the whole item; a dataset of records builds it from the record."""
        return self[index]

    def image_counts(self) -> list[int]:
        """How many images each item shows, in index order: what ``run.group_by_length`` groups training
        batches by (the text of an item grows with its images). One each unless a subclass says otherwise."""
        return [1] * len(self)


def check_split_datasets(datasets: dict) -> None:
    """Every ``datasets[name][split]`` is a :class:`SplitDataset`; TypeError naming the first that is not."""
    for name, by_split in datasets.items():
        for split, dataset in by_split.items():
            if not isinstance(dataset, SplitDataset):
                raise TypeError(
                    f"datasets.{name}.{split}: {type(dataset).__name__} is not a lavis.datasets.samples.SplitDataset "
                    "(the dataset contract: sample_id_key, sample_ids(), annotation_file, num_skipped)"
                )


class SampleSource(SplitDataset):
    """What the image-file and the shard datasets share: the sample format, processors, bad-sample
    policy, the files used for scoring and the count of skipped samples."""

    def __init__(
        self,
        sample_format: SampleFormat,
        vis_processor: Callable,
        text_processor: Callable[[str], str],
        on_bad_sample: str = "error",
        name: str = "dataset",
        annotation_file: str | None = None,
        question_file: str | None = None,
    ):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.sample_format = sample_format
        self.sample_id_key = sample_format.sample_id_key
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.on_bad_sample = on_bad_sample
        self.name = name
        self.annotation_file = annotation_file
        self.question_file = question_file
        self._skipped = SkipCounter()

    @property
    def num_skipped(self) -> int:
        """Items served by a replacement because their image could not be decoded (this rank, all workers,
        all epochs; a sample that fails in every epoch counts in every epoch)."""
        return self._skipped.value


class ImageDataset(SampleSource):
    """A map-style dataset over records that point at image files (``record["image_path"]``)."""

    def __init__(
        self,
        records: list[dict],
        sample_format: SampleFormat,
        vis_processor: Callable,
        text_processor: Callable[[str], str],
        on_bad_sample: str = "error",
        name: str = "dataset",
        annotation_file: str | None = None,
        question_file: str | None = None,
    ):
        super().__init__(
            sample_format, vis_processor, text_processor, on_bad_sample, name, annotation_file, question_file
        )
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def sample_ids(self) -> list[int]:
        """Every sample id of the split, in order (the runner's coverage check)."""
        return list(dict.fromkeys(r[self.sample_id_key] for r in self.records))

    def load(self, index: int) -> dict:
        """The item of ``index``; BadSample when its image cannot be used."""
        record = self.records[index]
        where = f"{self.name}: {record['image_path']} ({describe_record(record)})"
        image = decode_image(record["image_path"], where)
        try:
            pixels = self.vis_processor(image)
        except (OSError, ValueError) as err:
            raise BadSample(f"{where}: image processor failed: {err}") from err
        return self.sample_format.make_item(record, pixels, self.text_processor)

    def text_item(self, index: int) -> dict:
        return self.sample_format.make_item(self.records[index], None, self.text_processor)

    def __getitem__(self, index: int) -> dict:
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self.records)} samples")
        index %= len(self.records)
        for attempt in range(min(len(self.records), MAX_CONSECUTIVE_BAD)):
            current = (index + attempt) % len(self.records)
            try:
                return self.load(current)
            except BadSample as err:
                if self.on_bad_sample == "error":
                    raise DataError(f"{err} (set on_bad_sample: skip to replace bad samples)") from None
                if attempt == 0:
                    self._skipped.add()  # one per requested item served by a replacement
                logger.warning("skipped bad sample %d, trying the next one: %s", current, err)
        raise DataError(
            f"{self.name}: {MAX_CONSECUTIVE_BAD} consecutive samples from index {index} could not be read; "
            "the data is broken, not a few bad files"
        )


class DatasetView(SplitDataset):
    """A map-style dataset derived from ``base`` (a subset, or items with demonstrations) that keeps the
    dataset contract: ``sample_id_key``, ``sample_ids()``, ``sample_format``, ``annotation_file``,
    ``question_file`` and ``num_skipped`` are the base's. Nothing else is forwarded."""

    def __init__(self, base: SplitDataset):
        if not isinstance(base, SplitDataset):
            raise TypeError(f"{type(self).__name__} wraps a SplitDataset, got {type(base).__name__}")
        self.base = base

    @property
    def sample_id_key(self) -> str:
        return self.base.sample_id_key

    @property
    def sample_format(self):
        return self.base.sample_format

    @property
    def annotation_file(self):
        return self.base.annotation_file

    @property
    def question_file(self):
        return self.base.question_file

    @property
    def num_skipped(self) -> int:
        return self.base.num_skipped

    def sample_ids(self) -> list:
        """Every sample id of the view, in index order."""
        return self.base.sample_ids()

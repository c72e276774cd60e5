"""``data_type: webdataset``: any builder's split read from tar shards instead of image files.

The builder supplies the shard pattern and the scoring files of a split
(``shard_info``); this module indexes the shards (the up-front check: every
shard exists and every sample has an image and a well-formed JSON record list)
and returns a ``ShardDataset`` configured from the section's ``webdataset`` keys.
Shards are written by ``python -m lavis.datasets.pack_shards`` (see lavis/datasets/pack_shards.py).
"""

from __future__ import annotations

import logging

from lavis.common.errors import DataError
from lavis.datasets.shards import Shard, ShardDataset, ShardSample, expand_pattern, index_shard

logger = logging.getLogger(__name__)


def cap_shards(shards: list[Shard], cap: int | None) -> list[Shard]:
    """The first ``cap`` records in stored order (the same on every rank, so the partition stays exact)."""
    if cap is None:
        return shards
    out, left = [], cap
    for shard in shards:
        kept = Shard(shard.path)
        for sample in shard.samples:
            if left <= 0:
                break
            kept.samples.append(ShardSample(sample.key, sample.offset, sample.size, sample.records[:left]))
            left -= len(kept.samples[-1].records)
        if kept.samples:
            out.append(kept)
    return out


def build_shard_dataset(builder, split: str, role: str, vis_processor, text_processor) -> ShardDataset:
    """The streaming dataset of ``split`` of ``builder`` (role ``train`` shuffles, ``eval`` does not)."""
    pattern, sample_format, files = builder.shard_info(split, role)
    paths = expand_pattern(pattern)
    if not paths:
        raise DataError(f"{builder.name}/{split}: the shard pattern {pattern!r} names no file")
    shards = cap_shards([index_shard(path, sample_format) for path in paths], builder.cfg.max_samples)
    opts = builder.cfg.webdataset
    dataset = ShardDataset(
        shards,
        sample_format,
        vis_processor,
        text_processor,
        on_bad_sample=builder.cfg.on_bad_sample,
        name=f"{builder.name}/{split}",
        shuffle=bool(opts.shuffle) and role == "train",
        shuffle_buffer=int(opts.shuffle_buffer),
        seed=int(opts.seed),
        uneven=str(opts.uneven),
        **files,
    )
    if dataset.num_records == 0:
        raise DataError(f"{builder.name}/{split}: the shards {pattern!r} hold no sample")
    logger.info("%s/%s: %d records in %d shards", builder.name, split, dataset.num_records, len(shards))
    return dataset

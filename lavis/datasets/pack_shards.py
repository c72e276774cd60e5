"""Pack a split of a builder into webdataset shards (the format ``lavis.datasets.shards`` streams).

Shard layout (one tar sample per image, written with ``webdataset.TarWriter``)::

    <key>.jpg|.png|...   the original image file bytes, not re-encoded
    <key>.json           {"format": "caption_train" | "caption_eval" | "vqa",
                          "image_id": ..., "records": [record, ...]}

``records`` are the builder's records of that image without ``image_path`` (one
per caption for caption training, one per question for VQA), so a shard split
reads back to exactly the items of the image split. Each tar is written atomically.

CLI::

    python -m lavis.datasets.pack_shards --builder coco_caption --split train --out DIR \
        [--cfg-path project.yaml] [--options datasets.coco_caption.build_info.images=...] \
        [--samples-per-shard 1000]

prints the shard pattern and the exact ``--options`` that read the split from the shards
(``data_type: webdataset``); a train split read from shards needs no other file, an eval split only
its scoring files (ground truth, questions).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path

from lavis.common.errors import ConfigError, DataError, UserError
from lavis.common.fileio import atomic_writer
from lavis.datasets.samples import SampleFormat, describe_record


def group_by_image(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Records grouped by image file, in order of each image's first record."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["image_path"], []).append(record)
    return list(groups.items())


def _write_shard(path: Path, samples: list[dict]) -> None:
    """Write one tar atomically (``atomic_writer``: temporary file, fsync, rename)."""
    import webdataset

    with atomic_writer(path) as handle:
        writer = webdataset.TarWriter(handle, encoder=False, mtime=0)
        for sample in samples:
            writer.write(sample)
        writer.tarstream.close()  # the end-of-archive blocks, without closing our handle


def pack_records(
    records: list[dict], sample_format: SampleFormat, out_dir: str | Path, prefix: str, samples_per_shard: int = 1000
) -> str:
    """Pack records (with ``image_path``) into ``out_dir/prefix-NNNNNN.tar``; returns the brace pattern."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by_image(records)
    if not groups:
        raise DataError(f"nothing to pack into {out_dir}/{prefix}-*.tar: the split is empty")
    num_shards = math.ceil(len(groups) / samples_per_shard)
    for shard in range(num_shards):
        samples = []
        for n, (image_path, recs) in enumerate(groups[shard * samples_per_shard : (shard + 1) * samples_per_shard]):
            ext = Path(image_path).suffix.lstrip(".").lower() or "jpg"
            try:
                image_bytes = Path(image_path).read_bytes()
            except OSError as err:
                raise DataError(f"cannot read image {image_path} ({describe_record(recs[0])}): {err}") from None
            meta = {
                "format": sample_format.name,
                "image_id": recs[0]["image_id"],
                "records": [{k: v for k, v in r.items() if k != "image_path"} for r in recs],
            }
            key = f"s{shard * samples_per_shard + n:09d}"
            samples.append({"__key__": key, ext: image_bytes, "json": json.dumps(meta).encode("utf-8")})
        _write_shard(out_dir / f"{prefix}-{shard:06d}.tar", samples)
    return str(out_dir / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def main(argv=None) -> int:
    """Pack one split of a builder into shards and print the pattern."""
    from omegaconf import OmegaConf

    from lavis.common.config import dataset_default_path, parse_options, read_yaml
    from lavis.common.registry import registry
    from lavis.datasets.builders.base import check_image_files

    parser = argparse.ArgumentParser(
        prog="python -m lavis.datasets.pack_shards",
        description="Pack a COCO-caption or VQAv2 split into webdataset shards.",
    )
    parser.add_argument("--builder", required=True, help="builder name, e.g. coco_caption or vqav2")
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cfg-path", help="a YAML file with a datasets.<builder> section")
    parser.add_argument("--options", nargs="*", default=[], help="datasets.<builder>.key=value overrides")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar file")
    parser.add_argument("--prefix", help="shard file prefix (default: the split name)")
    args = parser.parse_args(argv)

    cls = registry.get("builder", args.builder, key_path="--builder")
    layers = []
    if dataset_default_path(args.builder).is_file():
        layers.append(read_yaml(dataset_default_path(args.builder)))
    if args.cfg_path:
        layers.append(read_yaml(args.cfg_path))
    layers.append(parse_options(args.options))
    merged = OmegaConf.merge(*layers)
    section = OmegaConf.to_container(merged, resolve=True).get("datasets", {}).get(args.builder, {})
    section["data_type"] = "images"
    builder = cls(section)
    try:
        builder.shard_key(args.split)  # a builder that cannot read shards is refused before any packing
    except NotImplementedError:
        raise ConfigError(f"--builder: {args.builder} is not read from webdataset shards") from None
    builder.prepare()  # a synthetic set generates itself first
    role = builder.role(args.split)
    records, sample_format, _ = builder.read_records(args.split, role)
    records = builder.capped(records, args.split)
    check_image_files(records, f"{args.builder}/{args.split}")
    pattern = pack_records(records, sample_format, args.out, args.prefix or args.split, args.samples_per_shard)
    print(f"packed {len(records)} {sample_format.name} records of {args.builder}/{args.split}")
    print(pattern)
    print("read the split from the shards with:")
    print("  --options " + " ".join(shlex.quote(o) for o in reading_options(builder, args.split, pattern)))
    if role != "train":
        source = builder.build_info_derived_from
        derived = f", derived from {source}" if source else ""
        print(
            f"  (an evaluated split is scored with its ground truth: keep datasets.{args.builder}.build_info's "
            f"scoring files of {args.split} on that node{derived})"
        )
    return 0


def reading_options(builder, split: str, pattern: str) -> list[str]:
    """The ``--options`` that make ``builder`` read ``split`` from the shards at ``pattern``."""
    key = f"datasets.{builder.name}"
    return [f"{key}.data_type=webdataset", f"{key}.splits=[{split}]", f"{key}.{builder.shard_key(split)}={pattern}"]


def run_cli(argv=None) -> None:
    """``main`` as a process: a user error is one line on stdout and exit status 2, without a traceback."""
    try:
        raise SystemExit(main(argv))
    except UserError as err:
        print(f"error: {err}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    run_cli()

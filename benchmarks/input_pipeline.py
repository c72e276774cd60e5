"""Images/s of the training input pipeline: our dataset + processor vs a bare PIL/torchvision loop.

Both sides do the same work on the same files: decode a JPEG, RandomResizedCrop
to 224 (bicubic), to tensor, CLIP normalisation, and stack a batch. Ours goes
through the coco_caption builder's records, ImageDataset (bad-sample handling,
items with captions) and the registered ``clip_image_train`` processor. The runs
alternate and each side keeps its best of ``--repeats`` to damp the noise of a
shared machine. Images per wall second are printed, but the headline compares
images per CPU second (this process plus its DataLoader workers), which other
people's jobs on the machine do not distort. The last line is
``input_pipeline_ratio=<ours / bare per CPU second, worst worker setting>``.

    python benchmarks/input_pipeline.py [--num-images 192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from lavis.common.registry import registry
from lavis.datasets.processors import CLIP_MEAN, CLIP_STD


def make_data(root: Path, n: int) -> dict:
    """n 320x256 JPEGs with noise (realistic decode cost) in Karpathy format."""
    rng = np.random.default_rng(0)
    images = []
    (root / "train2014").mkdir(parents=True)
    for i in range(n):
        name = f"COCO_train2014_{i:012d}.jpg"
        pixels = rng.integers(0, 256, size=(256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train2014" / name, quality=90)
        images.append(
            {
                "filepath": "train2014",
                "filename": name,
                "cocoid": i,
                "split": "train",
                "sentences": [{"raw": f"a photo number {i}"}],
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return {"images": str(root), "karpathy_file": str(root / "dataset_coco.json")}


class BareDataset(torch.utils.data.Dataset):
    """The baseline: a list of paths, PIL, the same torchvision transform."""

    def __init__(self, paths):
        self.paths = paths
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.ToTensor(),
                T.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def collate_ours(items):
    return torch.stack([it["image"] for it in items]), [it["text_input"] for it in items]


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def images_per_second(dataset, collate, workers: int, batch_size: int = 16) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process and its finished workers)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    start, cpu, count = time.perf_counter(), _cpu_seconds(), 0
    for batch in loader:
        count += len(batch[0]) if isinstance(batch, tuple) else len(batch)
    wall = time.perf_counter() - start
    del loader  # joins the workers so that their CPU time is counted
    return count / wall, count / (_cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-images", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        info = make_data(Path(tmp), args.num_images)
        section = {
            "build_info": info,
            "splits": ["train"],
            "vis_processor": {"train": {"name": "clip_image_train", "image_size": 224}},
        }
        ours = registry.get("builder", "coco_caption")(section).build_datasets()["train"]
        bare = BareDataset([r["image_path"] for r in ours.records])
        ratios = []
        for workers in (0, 2):
            wall = {"ours": 0.0, "bare": 0.0}
            cpu = {"ours": 0.0, "bare": 0.0}
            for _ in range(args.repeats):
                for name, dataset, collate in (("ours", ours, collate_ours), ("bare", bare, torch.stack)):
                    w, c = images_per_second(dataset, collate, workers)
                    wall[name], cpu[name] = max(wall[name], w), max(cpu[name], c)
            ratios.append(cpu["ours"] / cpu["bare"])
            print(
                f"num_workers={workers}: wall ours {wall['ours']:.1f} img/s, bare {wall['bare']:.1f} img/s "
                f"(ratio {wall['ours'] / wall['bare']:.3f}); per CPU second ours {cpu['ours']:.1f}, "
                f"bare {cpu['bare']:.1f} (ratio {ratios[-1]:.3f})"
            )
    print(f"input_pipeline_ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()

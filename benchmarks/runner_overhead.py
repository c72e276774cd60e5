"""Seconds per training step of the runner vs a bare PyTorch loop, measured side by side.

Both loops train the same MLP on the same in-memory data with the same AdamW,
batch size and gradient clipping. The time of a step is measured between two
consecutive calls of the loss function, so everything the runner does between
steps (data, schedule, clipping, logging, checkpoint bookkeeping) is counted,
and its one-off set-up is not. Loops alternate (bare, runner, bare, ...) and the
median of the repeats is used, so machine noise hits both alike.

Usage: python benchmarks/runner_overhead.py [--steps 300] [--repeats 3]
Last line: runner_overhead_ratio=<runner s/step / bare s/step>
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from lavis.datasets.samples import SplitDataset
from lavis.models.base import TrainableModel
from lavis.runners.run_config import RunConfig
from lavis.runners.runner import RunnerBase
from lavis.tasks.base import TaskConfig

IN, HIDDEN, BATCH = 256, 1024, 64


class Blobs(SplitDataset):
    sample_id_key = "id"

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "id": i}


class MLP(TrainableModel):
    """The same MLP on both sides; the runner needs the model contract (no hooks, no extra state)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 1)
        )

    def forward(self, x):
        return self.net(x)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


class TimedTask:
    """Just enough of the Task contract for training; records the time of every loss call."""

    sample_id_key = "id"
    Config = TaskConfig  # no run keys of its own

    def __init__(self):
        self.stamps: list[float] = []

    def collator(self, model, role):
        return collate

    def loss_count(self, batch) -> int:
        return len(batch["y"])

    def train_step(self, model, batch):
        # Summed, as the runner's task contract wants (it divides by loss_count): the bare loop's mean.
        self.stamps.append(time.perf_counter())
        return nn.functional.mse_loss(model(batch["x"]), batch["y"], reduction="sum")


def per_step(stamps: list[float], warmup: int) -> float:
    steady = stamps[warmup:]
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def bare_loop(steps: int, warmup: int) -> float:
    model, task = make_model(), TimedTask()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loader = DataLoader(Blobs(steps * BATCH), batch_size=BATCH, shuffle=True, collate_fn=collate, drop_last=True)
    for batch in loader:
        loss = task.train_step(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return per_step(task.stamps, warmup)


def runner_loop(steps: int, warmup: int, root: str, i: int) -> float:
    run = dataclasses.asdict(RunConfig())
    run.update(
        task="none",
        device="cpu",
        num_workers=0,
        output_dir=root,
        run_name=f"bench{i}",
        batch_size_train=BATCH,
        max_epoch=1,
        init_lr=1e-4,
        max_grad_norm=1.0,
        log_freq=50,
        save_epoch_end=False,
        progress_bar=True,
    )
    cfg = OmegaConf.create({"model": {}, "datasets": {}, "run": run})
    task = TimedTask()
    runner = RunnerBase(cfg, task, make_model(), {"blobs": {"train": Blobs(steps * BATCH)}})
    runner.train()
    runner.close()
    return per_step(task.stamps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warmup = min(20, args.steps // 5)
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            bare.append(bare_loop(args.steps, warmup))
            ours.append(runner_loop(args.steps, warmup, root, i))
            print(f"repeat {i}: bare {bare[-1] * 1e3:.3f} ms/step, runner {ours[-1] * 1e3:.3f} ms/step", flush=True)
    b, r = statistics.median(bare), statistics.median(ours)
    print(f"bare_s_per_step={b:.6f}")
    print(f"runner_s_per_step={r:.6f}")
    print(f"runner_overhead_ratio={r / b:.3f}")


if __name__ == "__main__":
    main()

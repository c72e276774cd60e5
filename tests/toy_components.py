"""A toy task, model and dataset for the runner tests (registered as task "toy_regression").

The model mimics the shape of the real one: a frozen "backbone" and a trainable
head with a norm, a gate, a bias and dropout (so RNG restoring matters on resume),
and it inherits the runner's hooks from ``TrainableModel``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from lavis.common.registry import registry
from lavis.datasets.samples import SplitDataset
from lavis.models.base import TrainableModel
from lavis.runners.run_config import RunConfig
from lavis.tasks.base import BaseTask, TaskConfig

DIM = 8


class ToyRegressionDataset(SplitDataset):
    """``n`` samples ``{"x", "y", "sample_id"}`` with y a fixed noisy linear function of x."""

    sample_id_key = "sample_id"

    def __init__(self, n: int, seed: int = 0, id_offset: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        w = torch.randn(DIM, 1, generator=torch.Generator().manual_seed(1234))
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)
        self.ids = [id_offset + i for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "sample_id": self.ids[i]}

    def sample_ids(self) -> list[int]:
        return list(self.ids)


class ToyModel(TrainableModel):
    """Frozen backbone + trainable head (names contain bias, norm, gate, embed on purpose)."""

    def __init__(self, seed: int = 0, dropout: float = 0.1, hidden: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(DIM, hidden)
        self.backbone.requires_grad_(False)
        self.embed_scale = nn.Parameter(torch.ones(hidden))
        self.proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.attn_gate = nn.Parameter(torch.tensor([0.5]))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.backbone(x)) * self.embed_scale
        h = h + torch.tanh(self.attn_gate) * self.dropout(torch.relu(self.proj(self.norm(h))))
        return self.head(h)


def collate(items: list[dict]) -> dict:
    return {
        "x": torch.stack([it["x"] for it in items]),
        "y": torch.stack([it["y"] for it in items]),
        "sample_id": [it["sample_id"] for it in items],
    }


@registry.register_task("toy_regression")
class ToyRegressionTask(BaseTask):
    """Mean-squared-error regression; ``agg_metrics`` is the negative validation MSE."""

    sample_id_key = "sample_id"

    @dataclass
    class Config(TaskConfig):
        # Unused by the runner; shows that task keys live beside the runner's in the run section.
        toy_option: int = 0

        def metric_names(self) -> list[str]:
            return ["agg_metrics", "mse", "n"]

    def __init__(self, cfg=None):  # the toy needs no config: cfg may be None
        self.cfg = cfg
        self.run_cfg = cfg.run if cfg is not None else None
        self.evaluated: list[tuple[str, int]] = []

    @classmethod
    def setup_task(cls, cfg):
        return cls(cfg)

    def collator(self, model, role):
        return collate

    def loss_count(self, batch):
        return batch["y"].numel()

    def train_step(self, model, batch):
        # Summed over the batch's targets; the runner divides by the step's count (the task contract).
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"], reduction="sum")

    def valid_step(self, model, batch):
        pred = model(batch["x"])
        return [
            {"sample_id": sid, "pred": float(p), "target": float(t)}
            for sid, p, t in zip(batch["sample_id"], pred[:, 0], batch["y"][:, 0])
        ]

    def evaluate(self, records, split, dataset, result_dir):
        self.evaluated.append((split, len(records)))
        mse = sum((r["pred"] - r["target"]) ** 2 for r in records) / len(records)
        return {"agg_metrics": -mse, "mse": mse, "n": len(records)}


def make_cfg(output_dir, **run) -> OmegaConf:
    """A validated-looking config: RunConfig defaults + the toy task + ``run`` overrides."""
    base = dataclasses.asdict(RunConfig())
    base.update(
        task="toy_regression",
        output_dir=str(output_dir),
        run_name="toy",
        batch_size_train=4,
        batch_size_eval=5,
        init_lr=0.05,
        warmup_steps=2,
        log_freq=1,
        progress_bar=False,
        max_epoch=2,
    )
    base.update(run)
    return OmegaConf.create({"model": {"arch": "toy"}, "datasets": {"toy": {}}, "run": base})


def make_datasets(n_train: int = 32, n_val: int = 13, seed: int = 0) -> dict:
    return {
        "toy": {
            "train": ToyRegressionDataset(n_train, seed),
            "val": ToyRegressionDataset(n_val, seed + 1, 1000),
            "test": ToyRegressionDataset(n_val, seed + 2, 2000),
        }
    }


def build_runner(cfg, model=None, datasets=None, task=None):
    """``registry.get("runner", cfg.run.runner)(cfg, task, model, datasets)`` with toy parts."""
    model = model if model is not None else ToyModel()
    task = task if task is not None else ToyRegressionTask(cfg)
    datasets = datasets if datasets is not None else make_datasets()
    return registry.get("runner", cfg.run.runner)(cfg, task, model, datasets)


def trainable_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# The run of tests/scripts/ddp_toy_run.py: per-rank batch 4, 2 micro-batches per step, 2 epochs.
DDP_RUN = dict(
    batch_size_train=4,
    accum_grad_iters=2,
    max_epoch=2,
    valid_splits=["val"],
    test_splits=["val"],
    log_freq=1,
    max_grad_norm=1.0,
)

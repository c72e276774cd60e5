"""What the GPU checks share (benchmarks/gpu_check.py and gpu_checks/throughput.py): the tiny model's config
with LoRA, a training batch on the GPU, the runner on a caption-like set, the ``Skip`` exception and the
scratch folder ``WORK`` (gpu_check's main removes it at the end).

Imports the test helpers (tests/ on sys.path), as gpu_check.py did before this module was split from it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from test_training_hooks import TINY_YAML, CaptionLikeDataset, CaptionLikeTask  # noqa: E402
from toy_components import make_cfg  # noqa: E402

from lavis.common.config import read_yaml  # noqa: E402
from lavis.common.registry import registry  # noqa: E402
from lavis.models import build_model  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="gpu_check-"))
LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
TRAIN_PARTS = {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": False, "lm_embeddings": False}


class Skip(Exception):
    """A check that cannot run here (an optional package is missing)."""


def model_cfg(**overrides) -> dict:
    cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(read_yaml(TINY_YAML).model).items()}
    cfg.update(adapters=LORA, trainable=TRAIN_PARTS)
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def batch_for(model, n: int, seed: int = 0) -> dict:
    task = CaptionLikeTask(make_cfg(WORK))
    dataset = CaptionLikeDataset(n, model.image_size, seed=seed)
    batch = task.collator(model, "train")([dataset[i] for i in range(n)])
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_runner(run_name: str, amp: str = "fp32", model=None, **run):
    """The runner on the tiny model and a caption-like set (24 samples, batch 4): (runner, summary)."""
    from test_training_hooks import CaptionLikeTask as Task

    class EvalTask(Task):
        def valid_step(self, model, batch):
            return [{"sample_id": i, "text": t} for i, t in zip(batch["sample_id"], self.generate_text(model, batch))]

        def evaluate(self, records, split, dataset):
            return {"agg_metrics": float(len(records)), "n": len(records)}

    settings = dict(
        device="cuda",
        amp=amp,
        batch_size_train=4,
        max_epoch=1,
        warmup_steps=1,
        init_lr=1e-3,
        valid_splits=["val"],
        best_metric="n",
        max_new_tokens=4,
        num_beams=1,
        min_new_tokens=0,
        length_penalty=1.0,
        batch_size_eval=4,
        save_epoch_end=False,
        run_name=run_name,
    )
    cfg = make_cfg(WORK, **{**settings, **run})
    torch.manual_seed(0)
    model = model if model is not None else build_model(model_cfg())
    datasets = {
        "lm": {"train": CaptionLikeDataset(24, model.image_size), "val": CaptionLikeDataset(5, model.image_size, 1)}
    }
    runner = registry.get("runner", "runner_base")(cfg, EvalTask(cfg), model, datasets)
    return runner, runner.train()

"""Toy training under torchrun, for tests/test_runner_ddp.py.

Usage: torchrun --nproc_per_node=2 ddp_toy_run.py OUT_DIR MODE
MODE "train": train to the end; each rank saves its trainable parameters and counts
DDP gradient all-reduces (a comm hook) to OUT_DIR/rank<r>.pt.
MODE "sigterm": rank 1 alone sends itself SIGTERM in its third train_step; every
rank must stop at the same step boundary, save, and exit 0.
MODE "slow": slow steps; OUT_DIR/started appears once training runs (the test then sends SIGTERM
to the launcher, scripts/preemptible_torchrun.py).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

import lavis.common.registry as registry_module  # noqa: E402

# The toy run needs none of the model/dataset/task packages, whose import (transformers, open_clip)
# costs several CPU-seconds per rank; the runner and lr schedules register when lavis.runners is imported.
registry_module._BUILTINS_IMPORTED = True
from toy_components import DDP_RUN, ToyModel, ToyRegressionTask, build_runner, make_cfg, make_datasets  # noqa: E402

import lavis.runners  # noqa: E402, F401
from lavis.runners.runner import RunnerBase  # noqa: E402

out_dir, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
allreduces = {"n": 0}

real_wrap = RunnerBase._wrap_ddp


def counting_wrap(self, model):
    wrapped = real_wrap(self, model)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        allreduces["n"] += 1
        return allreduce_hook(state, bucket)

    wrapped.register_comm_hook(None, hook)
    return wrapped


RunnerBase._wrap_ddp = counting_wrap


class SigtermOnRank1(ToyRegressionTask):
    calls = 0

    def train_step(self, model, batch):
        self.calls += 1
        if rank == 1 and self.calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(model, batch)


class Slow(ToyRegressionTask):
    """Slow steps, and a marker file once training runs: the test then signals the launcher (mode "slow")."""

    calls = 0

    def train_step(self, model, batch):
        self.calls += 1
        if rank == 0 and self.calls == 3:
            (out_dir / "started").write_text("")
        time.sleep(0.2)
        return super().train_step(model, batch)


cfg = make_cfg(out_dir / "runs", **DDP_RUN)
task = {"sigterm": SigtermOnRank1, "slow": Slow}.get(mode, ToyRegressionTask)(cfg)
datasets = make_datasets(n_train=64)
datasets["toy"]["train"].num_skipped = rank + 1  # bad samples each rank skipped: 1 + 2 over both ranks
runner = build_runner(cfg, model=ToyModel(dropout=0.0), datasets=datasets, task=task)
summary = runner.train()
torch.save(
    {name: p.detach() for name, p in runner.model.named_parameters() if p.requires_grad}, out_dir / f"rank{rank}.pt"
)
(out_dir / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "status": summary["status"],
            "step": summary["step"],
            "allreduces": allreduces["n"],
            "val": summary.get("test", {}).get("val", {}).get("toy"),
            "run_dir": summary["run_dir"],
        }
    )
)
runner.close()

"""Two processes under torchrun on gloo: identical replicas, equal to one process, SIGTERM agreement.

Each test launches one 2-process torchrun job (a few seconds, single-threaded ranks).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_components import DDP_RUN, ToyModel, build_runner, make_cfg, make_datasets, trainable_params

from lavis.common.logging import read_metrics
from lavis.runners import checkpoint as ckpt

SCRIPT = Path(__file__).parent / "scripts" / "ddp_toy_run.py"

pytestmark = pytest.mark.slow


def torchrun(out_dir: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(out_dir),
        mode,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def rank_results(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_stay_identical_and_match_one_process_with_the_same_global_batch(tmp_path):
    proc = torchrun(tmp_path, "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = rank_results(tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # 8 steps of 2 micro-batches: one gradient all-reduce per step, none on the first micro-batch (no_sync).
    assert [r["step"] for r in results] == [8, 8]
    assert [r["allreduces"] for r in results] == [8, 8]

    # One process with a per-process batch twice as large sees the same samples in each step.
    single = build_runner(
        make_cfg(tmp_path / "single", **dict(DDP_RUN, batch_size_train=8)),
        model=ToyModel(dropout=0.0),
        datasets=make_datasets(n_train=64),
    )
    summary = single.train()
    reference = trainable_params(single.model)
    for name in reference:
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    # The sharded evaluation (13 samples padded to 14 over 2 ranks) scored every sample exactly once.
    assert results[0]["val"] == results[1]["val"]
    assert results[0]["val"]["n"] == 13
    assert results[0]["val"]["mse"] == pytest.approx(summary["test"]["val"]["toy"]["mse"], rel=1e-5)
    ddp_train = [r for r in read_metrics(Path(results[0]["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    ddp_losses = [r["loss"] for r in ddp_train]
    # Each rank's count of skipped samples is summed over ranks (rank 0 skipped 1, rank 1 skipped 2).
    assert ddp_train and all(r["data/num_skipped"] == 3 for r in ddp_train)
    single_losses = [r["loss"] for r in read_metrics(single.paths.metrics) if r["split"] == "train"]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_exits_zero(tmp_path):
    proc = torchrun(tmp_path, "sigterm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = rank_results(tmp_path)
    assert [(r["status"], r["step"]) for r in results] == [("preempted", 2), ("preempted", 2)]
    run_dir = Path(results[0]["run_dir"])
    assert "resume with --options run.resume_ckpt_path=latest" in proc.stdout
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["progress"]["global_step"] == 2 and state["world_size"] == 2
    assert len(state["rng"]) == 2  # one RNG state per rank

"""Resuming equals never stopping: bitwise weights and identical metrics.jsonl on CPU in fp32.

The interruption is simulated three ways: an exception at a random step between
checkpoints (like a kill: metrics.jsonl then holds lines the resumed run redoes),
``run.max_steps``, and SIGTERM (preemption: save at the next step boundary).
"""

import os
import random
import signal

import pytest
import torch
from toy_components import ToyModel, ToyRegressionTask, build_runner, make_cfg, trainable_params

from lavis.common.errors import CheckpointError
from lavis.common.logging import read_metrics
from lavis.runners import checkpoint as ckpt
from lavis.runners.progress import without_timing
from lavis.runners.resume_check import resume_differences

# Two periods of 8 steps (32 samples, batch 4); checkpoints every 3 steps and at period ends.
COMMON = dict(valid_splits=["val"], test_splits=["test"], save_freq_steps=3, keep_last=2, max_epoch=2)


class Killed(Exception):
    pass


class KillingTask(ToyRegressionTask):
    """Raises at the n-th train_step call (1-based), or sends itself SIGTERM there."""

    def __init__(self, cfg, at_call, how="raise"):
        super().__init__(cfg)
        self.at_call, self.how, self.calls = at_call, how, 0

    def train_step(self, model, batch):
        self.calls += 1
        if self.calls == self.at_call:
            if self.how == "raise":
                raise Killed(f"simulated kill at call {self.calls}")
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(model, batch)


def finished_run(root, **run):
    cfg = make_cfg(root, **run)
    runner = build_runner(cfg, model=ToyModel())
    summary = runner.train()
    return runner, summary


def assert_same_run(a_runner, b_runner):
    a, b = trainable_params(a_runner.model), trainable_params(b_runner.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Measured figures (step time, throughput, memory, ETA) are not part of the computation.
    a_metrics = [without_timing(r) for r in read_metrics(a_runner.paths.metrics)]
    b_metrics = [without_timing(r) for r in read_metrics(b_runner.paths.metrics)]
    assert len(a_metrics) == len(b_metrics)
    assert a_metrics == b_metrics
    a_best = ckpt.load_checkpoint(a_runner.paths.checkpoints / "best.pt")
    b_best = ckpt.load_checkpoint(b_runner.paths.checkpoints / "best.pt")
    assert a_best["best"] == b_best["best"]


KILL_STEPS = random.Random(2024).sample([s for s in range(2, 16) if s % 3 and s != 8], 2)


@pytest.mark.parametrize("runner_name", ["runner_base", "runner_iter"])
@pytest.mark.parametrize("kill_call", KILL_STEPS)
def test_kill_at_random_step_then_resume_latest_equals_uninterrupted(tmp_path, kill_call, runner_name):
    run = dict(COMMON, runner=runner_name, max_iters=14, iters_per_inner_epoch=5)
    reference, _ = finished_run(tmp_path / "ref", **run)

    cfg = make_cfg(tmp_path / "cut", **run)
    with pytest.raises(Killed):
        build_runner(cfg, model=ToyModel(), task=KillingTask(cfg, kill_call)).train()
    steps_logged = [r["step"] for r in read_metrics(tmp_path / "cut" / "toy" / "metrics.jsonl")]
    assert max(steps_logged) == kill_call - 1  # lines past the last checkpoint, to be dropped on resume

    resumed_cfg = make_cfg(tmp_path / "cut", resume_ckpt_path="latest", **run)
    resumed = build_runner(resumed_cfg, model=ToyModel())
    summary = resumed.train()
    assert summary["status"] == "finished"
    assert_same_run(reference, resumed)


def test_max_steps_cut_then_resume_equals_uninterrupted(tmp_path):
    reference, _ = finished_run(tmp_path / "ref", **COMMON)
    _, cut = finished_run(tmp_path / "cut", max_steps=5, **COMMON)
    assert cut["status"] == "max_steps" and cut["step"] == 5
    path = ckpt.step_checkpoint_path(tmp_path / "cut" / "toy", 5)
    assert path.is_file()
    # An explicit path inside the run folder resumes into that folder.
    resumed, summary = finished_run(tmp_path / "cut", resume_ckpt_path=str(path), **COMMON)
    assert summary["status"] == "finished" and resumed.paths.run_dir == tmp_path / "cut" / "toy"
    assert_same_run(reference, resumed)


def test_sigterm_saves_at_next_step_boundary_and_resumes_exactly(tmp_path, caplog):
    reference, _ = finished_run(tmp_path / "ref", **COMMON)
    cfg = make_cfg(tmp_path / "cut", **COMMON)
    runner = build_runner(cfg, model=ToyModel(), task=KillingTask(cfg, 5, how="sigterm"))
    with caplog.at_level("WARNING", logger="lavis"):
        summary = runner.train()
    assert summary["status"] == "preempted" and summary["step"] == 5
    assert ckpt.latest_checkpoint(runner.paths.run_dir).name == "step_00000005.pt"
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is restored
    resumed, _ = finished_run(tmp_path / "cut", resume_ckpt_path="latest", **COMMON)
    assert_same_run(reference, resumed)


def test_latest_starts_from_scratch_and_every_requeue_continues(tmp_path):
    # A cluster requeue passes the same options every time, the first start included.
    killed = build_runner(
        make_cfg(tmp_path, resume_ckpt_path="latest", **COMMON),
        task=KillingTask(make_cfg(tmp_path, **COMMON), at_call=2),
        model=ToyModel(),
    )
    with pytest.raises(Killed):  # killed before the first checkpoint (step 3)
        killed.train()
    killed.close()
    assert not ckpt.list_step_checkpoints(tmp_path / "toy") and read_metrics(killed.paths.metrics)
    requeued, summary = finished_run(tmp_path, resume_ckpt_path="latest", **COMMON)
    assert summary["status"] == "finished"
    reference, _ = finished_run(tmp_path / "reference", **COMMON)
    assert_same_run(requeued, reference)  # the killed attempt's metrics lines are gone too


def test_checkpoint_holds_only_trainable_weights_and_full_state(tmp_path):
    runner, _ = finished_run(tmp_path, max_steps=3, **COMMON)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(runner.paths.run_dir))
    assert not any(name.startswith("backbone") for name in state["model"])
    assert set(state["model"]) == set(trainable_params(runner.model))
    assert state["progress"] == {"global_step": 3, "data_epoch": 0, "position": 3, "metrics_lines": 3}
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "best", "world_size"} <= set(state)
    assert state["config"]["run"]["max_steps"] == 3 and len(state["rng"]) == 1


def test_resume_with_a_different_order_defining_config_names_each_key(tmp_path):
    finished_run(tmp_path, max_steps=3, **COMMON)
    cfg = make_cfg(tmp_path, resume_ckpt_path="latest", **dict(COMMON, batch_size_train=8, seed=7, max_epoch=3))
    cfg.datasets.toy = {"root": "elsewhere"}
    with pytest.raises(CheckpointError) as err:
        build_runner(cfg, model=ToyModel()).train()
    message = str(err.value)
    assert "step_00000003.pt: the config differs" in message
    for part in (
        "run.batch_size_train: 4 -> 8",
        "run.seed: 42 -> 7",
        "run.max_epoch: 2 -> 3",
        "datasets.toy.root: '<absent>' -> 'elsewhere'",
    ):
        assert part in message
    # Keys that do not move the position may change (max_steps, log_freq); the iteration runner ignores max_epoch.
    resumed, summary = finished_run(tmp_path, resume_ckpt_path="latest", log_freq=2, **COMMON)
    assert summary["status"] == "finished"


def test_close_is_idempotent_after_train_and_after_an_error(tmp_path, monkeypatch):
    from lavis.common import dist

    calls = []
    monkeypatch.setattr(dist, "destroy", lambda wait=True: calls.append(wait))
    runner, _ = finished_run(tmp_path / "ok", max_steps=2, **COMMON)
    runner.close()
    runner.close()
    assert calls == [True]  # a normal end waits for the peers, once
    cfg = make_cfg(tmp_path / "bad", **COMMON)
    failing = build_runner(cfg, model=ToyModel(), task=KillingTask(cfg, 2))
    with pytest.raises(Killed):
        failing.train()
    failing.close()
    failing.close()
    assert calls == [True, False]  # after an error: leave at once, peers may never reach a barrier


def test_a_checkpoint_from_before_an_order_key_existed_resumes_under_its_old_meaning():
    written_before = {"run": {"batch_size_train": 4, "seed": 42}}  # no group_by_length, no train_max_shots
    now = {"run": {"batch_size_train": 4, "seed": 42, "group_by_length": False, "train_max_shots": 0}}
    assert resume_differences(written_before, now, ()) == []
    grouped = {"run": {**now["run"], "group_by_length": True, "train_max_shots": 2}}
    assert resume_differences(written_before, grouped, ()) == [
        "run.group_by_length: False -> True",
        "run.train_max_shots: 0 -> 2",
    ]

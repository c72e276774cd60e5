"""The runner in one process: accumulation, outputs, metrics.jsonl, precision checks, best/test, evaluation."""

import pytest
import torch
import yaml
from toy_components import (
    ToyModel,
    ToyRegressionDataset,
    ToyRegressionTask,
    build_runner,
    collate,
    make_cfg,
    make_datasets,
)

from lavis.common.errors import ConfigError, DataError
from lavis.common.logging import read_metrics
from lavis.runners import checkpoint as ckpt
from lavis.runners import precision
from lavis.runners.data import TrainStream
from lavis.runners.optim import build_lr_schedule, build_optimizer
from lavis.runners.progress import TIMING_KEYS


def train(root, model=None, datasets=None, task=None, **run):
    cfg = make_cfg(root, **run)
    runner = build_runner(
        cfg, model=model if model is not None else ToyModel(dropout=0.0), datasets=datasets, task=task
    )
    return runner, runner.train()


def test_accumulating_4_micro_batches_equals_one_batch_4x_larger(tmp_path):
    data = make_datasets(n_train=64)
    common = dict(max_epoch=1, max_grad_norm=0.5, weight_decay=0.05)
    small, _ = train(tmp_path / "a", datasets=data, batch_size_train=4, accum_grad_iters=4, **common)
    large, _ = train(tmp_path / "b", datasets=data, batch_size_train=16, accum_grad_iters=1, **common)
    assert small.global_step == large.global_step == 4
    for (name, p), (_, q) in zip(small.model.named_parameters(), large.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    small_losses = [r["loss"] for r in read_metrics(small.paths.metrics)]
    large_losses = [r["loss"] for r in read_metrics(large.paths.metrics)]
    assert small_losses == pytest.approx(large_losses, rel=1e-5)
    # The model did move: the comparison is not between two untouched models.
    assert not torch.equal(ToyModel(dropout=0.0).proj.weight, small.model.proj.weight)


def test_run_directory_layout_and_metrics_jsonl(tmp_path):
    data = make_datasets()
    data["toy"]["train"].num_skipped = 3  # a dataset that counts the bad samples it skipped
    runner, summary = train(
        tmp_path, datasets=data, log_freq=3, valid_splits=["val"], test_splits=["test"], lr_sched="constant_lr"
    )
    run_dir = tmp_path / "toy"
    assert summary["status"] == "finished" and summary["run_dir"] == str(run_dir)
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "log.txt", "metrics.jsonl", "checkpoints", "results"}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["log_freq"] == 3 and saved["run"]["task"] == "toy_regression"
    assert "eval toy.val at step 8" in (run_dir / "log.txt").read_text()

    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6, 9, 12, 15]
    assert [r["epoch"] for r in train_records] == [0, 0, 1, 1, 1]
    # constant_lr with 2 warmup steps: the lr of the step just taken.
    assert [r["lr"] for r in train_records] == pytest.approx([0.05] * 5)
    for r in train_records:
        assert set(r) == {"epoch", "step", "split", "lr", "loss", "grad_norm", "data/num_skipped", *TIMING_KEYS}
        assert r["loss"] > 0 and r["data/num_skipped"] == 3
    evals = [r for r in records if r["split"] != "train"]
    assert [(r["split"], r["step"], r["epoch"]) for r in evals] == [("val", 8, 0), ("val", 16, 1), ("test", 16, 1)]
    for r in evals:
        assert r["dataset"] == "toy" and r["n"] == 13 and r["agg_metrics"] == pytest.approx(-r["mse"])
    assert summary["test"]["test"]["toy"]["mse"] == evals[-1]["mse"]


def test_existing_run_directory_is_never_overwritten(tmp_path):
    train(tmp_path, max_epoch=1)
    before = (tmp_path / "toy" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"run.run_name: .*toy already exists and is never overwritten"):
        build_runner(make_cfg(tmp_path, max_epoch=1))
    assert (tmp_path / "toy" / "metrics.jsonl").read_bytes() == before
    # Without a name, each run gets its own timestamped folder.
    a = build_runner(make_cfg(tmp_path, run_name=None)).paths.run_dir
    b = build_runner(make_cfg(tmp_path, run_name=None)).paths.run_dir
    assert a != b and a.parent == b.parent == tmp_path


def test_bf16_is_refused_on_a_device_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(precision.dist, "bf16_supported", lambda device: False)
    with pytest.raises(ConfigError, match="run.amp: bf16 is not supported on cpu .* use run.amp=fp16"):
        build_runner(make_cfg(tmp_path, amp="bf16"))
    assert not (tmp_path / "toy").exists()


def test_fp16_on_cpu_is_refused_and_bf16_on_cpu_trains(tmp_path):
    with pytest.raises(ConfigError, match="run.amp: fp16 mixed precision is only supported on CUDA"):
        build_runner(make_cfg(tmp_path, amp="fp16"))
    runner, summary = train(tmp_path, amp="bf16", max_epoch=1)
    losses = [r["loss"] for r in read_metrics(runner.paths.metrics)]
    assert summary["status"] == "finished" and len(losses) == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    assert runner.model.proj.weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_best_checkpoint_follows_split_metric_and_direction(tmp_path):
    data = make_datasets()
    runner, summary = train(
        tmp_path,
        datasets=data,
        max_epoch=3,
        valid_splits=["val", "test"],
        best_split="test",
        best_metric="mse",
        best_mode="min",
        test_splits=["test"],
    )
    tests = [r for r in read_metrics(runner.paths.metrics) if r["split"] == "test"]
    best_record = min(tests[:-1], key=lambda r: r["mse"])
    assert summary["best"] == {"metric": pytest.approx(best_record["mse"]), "step": best_record["step"]}
    best = ckpt.load_checkpoint(runner.paths.checkpoints / "best.pt")
    assert best["step"] == best_record["step"] and best["best"]["split"] == "test"
    # The final test ran with the best weights: it reproduces the best epoch's score.
    assert tests[-1]["mse"] == pytest.approx(best_record["mse"])


def test_evaluate_only_loads_weights_and_scores(tmp_path):
    runner, _ = train(tmp_path / "t", max_epoch=1, valid_splits=["val"])
    best = runner.paths.checkpoints / "best.pt"
    cfg = make_cfg(tmp_path / "e", evaluate=True, resume_ckpt_path=str(best), test_splits=["val"])
    evaluator = build_runner(cfg, model=ToyModel(dropout=0.0))
    summary = evaluator.train()
    trained_val = [r for r in read_metrics(runner.paths.metrics) if r["split"] == "val"][-1]
    assert summary["status"] == "evaluated"
    assert summary["test"]["val"]["toy"]["mse"] == pytest.approx(trained_val["mse"])
    assert evaluator.paths.run_dir == tmp_path / "e" / "toy"


class DroppingTask(ToyRegressionTask):
    """A buggy task that loses the first sample of every evaluation batch."""

    def valid_step(self, model, batch):
        return super().valid_step(model, batch)[1:]


def test_incomplete_evaluation_names_the_missing_ids(tmp_path):
    runner = build_runner(make_cfg(tmp_path), task=DroppingTask(None))
    with pytest.raises(DataError, match=r"toy.val: .* 3 missing \(e.g. \[1000, 1005, 1010\]\)"):
        runner.evaluate("val")


def test_evaluation_deduplicates_and_uses_unwrapped_model_in_eval_mode(tmp_path):
    seen = []

    class Spy(ToyRegressionTask):
        def valid_step(self, model, batch):
            seen.append((type(model).__name__, model.training))
            return super().valid_step(model, batch) * 2  # every record twice

    datasets = {"toy": {"train": ToyRegressionDataset(32), "val": ToyRegressionDataset(7, 0)}}
    runner = build_runner(make_cfg(tmp_path), task=Spy(None), datasets=datasets)
    metrics = runner.evaluate("val")
    assert metrics["toy"]["n"] == 7
    assert set(seen) == {("ToyModel", False)} and runner.model.training


def test_lr_schedule_length_ignores_max_steps(tmp_path):
    runner = build_runner(make_cfg(tmp_path, max_steps=3))
    runner.train()
    assert runner.total_steps == 16 and runner.global_step == 3
    opt = build_optimizer(ToyModel(), runner.run_cfg)
    assert runner.schedule.base_lr(10) == build_lr_schedule(opt, runner.run_cfg, 16, 8).base_lr(10)


def test_bad_run_values_are_reported_together(tmp_path):
    # A run section built in code gets the loader's checks (RunConfig.validate), all in one error.
    pattern = r"(?s)run: 2 problem\(s\).*run.accum_grad_iters: must be >= 1, got 0.*run.best_split: 'x'"
    with pytest.raises(ConfigError, match=pattern):
        build_runner(make_cfg(tmp_path, accum_grad_iters=0, best_split="x"))
    with pytest.raises(ConfigError, match=r"run.batch_size_train=40 .* needs more samples"):
        build_runner(make_cfg(tmp_path, run_name="small", batch_size_train=40)).train()


def test_tensorboard_and_offline_wandb_write_files_without_network(tmp_path):
    runner, _ = train(tmp_path, max_epoch=1, tensorboard=True, wandb={"mode": "offline", "project": "t", "name": None})
    assert list((runner.paths.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((runner.paths.run_dir / "wandb").glob("offline-run-*"))


def test_unknown_split_names_fail_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"run.valid_splits: no dataset has the split 'vall'; available: \["):
        build_runner(make_cfg(tmp_path, valid_splits=["vall"]))


def test_adapter_budget_is_not_updated_on_a_step_the_grad_scaler_skipped(tmp_path, monkeypatch):
    class InfAtCall3(ToyRegressionTask):
        calls = 0

        def train_step(self, model, batch):
            self.calls += 1
            loss = super().train_step(model, batch)
            return loss * float("inf") if self.calls == 3 else loss

    scored = []
    # A model with an optimizer-step hook (as OpenFlamingo has with AdaLoRA) that records the steps it sees.
    monkeypatch.setattr(ToyModel, "optimizer_step_hook", lambda self: scored.append, raising=False)
    # fp16 needs CUDA; a real (enabled) CPU GradScaler skips the inf step the same way.
    monkeypatch.setattr(precision.Precision, "grad_scaler", lambda self: torch.amp.GradScaler("cpu"))
    runner, summary = train(tmp_path, task=InfAtCall3(None), max_epoch=1, max_grad_norm=None)
    assert summary["status"] == "finished" and runner.global_step == 8
    assert scored == [0, 1, 3, 4, 5, 6, 7]  # step 2 (the 3rd) had inf gradients: skipped, not scored


def test_a_bug_in_task_evaluate_keeps_its_traceback_under_ddp(tmp_path, monkeypatch, caplog):
    from lavis.common import dist
    from lavis.common.dist import DistInfo
    from lavis.runners.evaluation import _RemoteError, evaluate_split

    class Buggy(ToyRegressionTask):
        def evaluate(self, records, split, dataset, result_dir):
            raise ZeroDivisionError("bug in the metric")

    runner = build_runner(make_cfg(tmp_path), task=Buggy(None))
    args = dict(
        task=runner.task,
        model=runner.model,
        dataset=make_datasets()["toy"]["val"],
        dataset_name="toy",
        split="val",
        precision=runner.precision,
        batch_size=5,
    )
    # Rank 0 of 2 in this single process: the broadcast is a no-op, and rank 1's half of the records is missing.
    monkeypatch.setattr(dist, "check_coverage", lambda *a, **k: None)
    # Rank 0 re-raises the original exception, logged with its traceback.
    with caplog.at_level("ERROR", logger="lavis"), pytest.raises(ZeroDivisionError, match="bug in the metric"):
        evaluate_split(dist_info=DistInfo(0, 2, 0, torch.device("cpu")), **args)
    assert "rank 0 failed to score toy.val" in caplog.text and "Traceback" in caplog.text
    # Another rank receives rank 0's summary.
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: {"error": _RemoteError("rank 0 failed: boom")})
    with pytest.raises(_RemoteError, match="rank 0 failed"):
        evaluate_split(dist_info=DistInfo(1, 2, 1, torch.device("cpu")), **args)


def two_datasets_with_val() -> dict:
    data = make_datasets()
    data["other"] = {"val": ToyRegressionDataset(9, 5, 5000)}
    return data


def test_several_datasets_with_the_best_split_need_run_best_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"run.best_dataset: several datasets have the split 'val' .*'toy', 'other'"):
        build_runner(make_cfg(tmp_path, valid_splits=["val"]), datasets=two_datasets_with_val())
    with pytest.raises(ConfigError, match=r"run.best_dataset: 'nope' has no split 'val'"):
        build_runner(make_cfg(tmp_path, valid_splits=["val"], best_dataset="nope"), datasets=two_datasets_with_val())


def test_run_best_dataset_chooses_whose_metric_picks_the_best_checkpoint(tmp_path):
    runner, summary = train(
        tmp_path,
        datasets=two_datasets_with_val(),
        max_epoch=2,
        valid_splits=["val"],
        best_dataset="other",
        best_metric="mse",
        best_mode="min",
    )
    other = [r for r in read_metrics(runner.paths.metrics) if r.get("dataset") == "other"]
    toy = [r for r in read_metrics(runner.paths.metrics) if r.get("dataset") == "toy"]
    best = min(other, key=lambda r: r["mse"])
    assert len(other) == len(toy) == 2 and other[0]["mse"] != toy[0]["mse"]
    assert summary["best"] == {"metric": pytest.approx(best["mse"]), "step": best["step"]}


def test_an_unwritable_output_dir_is_a_config_error_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run.output_dir: cannot create the run directory under .*a_file/out"):
        build_runner(make_cfg(blocker / "out"))


def test_sequence_reduction_weighs_each_micro_batch_equally_and_token_reduction_each_target(tmp_path):
    class UnevenTask(ToyRegressionTask):
        """Micro-batches claim 1 or 2 targets (by their first id), so the two reductions differ."""

        def loss_count(self, batch):
            return 1 if batch["sample_id"][0] % 2 else 2

    logged = {}
    for reduction in ("token", "sequence"):
        runner, _ = train(
            tmp_path / reduction,
            task=UnevenTask(None),
            max_epoch=1,
            max_steps=1,
            batch_size_train=2,
            accum_grad_iters=2,
            loss_reduction=reduction,
            max_grad_norm=None,
        )
        logged[reduction] = read_metrics(runner.paths.metrics)[0]["loss"]
    # The same first step (the runner's order: seed 42, one process), with the untrained model.
    stream = TrainStream(make_datasets()["toy"]["train"], collate, batch_size=2, accum=2, rank=0, world_size=1, seed=42)
    task, model = UnevenTask(None), ToyModel(dropout=0.0)
    with torch.no_grad():
        batches = stream.next_step()
        sums = [float(task.train_step(model, b)) for b in batches]
    counts = [task.loss_count(b) for b in batches]
    assert counts in ([1, 2], [2, 1], [2, 2], [1, 1]) and len(set(s / n for s, n in zip(sums, counts))) == 2
    assert logged["token"] == pytest.approx(sum(sums) / sum(counts), rel=1e-6)
    assert logged["sequence"] == pytest.approx(sum(s / n for s, n in zip(sums, counts)) / 2, rel=1e-6)

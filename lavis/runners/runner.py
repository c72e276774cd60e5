"""The training loop of ``runner_base`` (epochs), shared by ``runner_iter`` (iterations, runner_iter.py).

Both run one loop over optimizer steps, cut into periods: an epoch of the data
for ``runner_base``, ``iters_per_inner_epoch`` steps for ``runner_iter``. At the
end of a period the runner evaluates (every ``val_freq`` periods) and saves; at
every step boundary it may log, save, stop for ``max_steps`` or stop for SIGTERM.
Checkpoints are only taken at step boundaries after the period-end work, so
``global_step`` alone says where a resumed run continues. Saving and resuming are
``RunCheckpoints`` (run_checkpoints.py).
"""

from __future__ import annotations

import gc
import time

import torch

from lavis.common import dist
from lavis.common.config import run_section
from lavis.common.errors import ConfigError
from lavis.common.logging import format_metrics, get_logger, progress_bar
from lavis.common.registry import registry
from lavis.datasets.samples import check_split_datasets
from lavis.runners import checkpoint as ckpt
from lavis.runners import provenance
from lavis.runners.data import TrainStream, concat_train_datasets, leaf_datasets, loader_workers, move_to_device
from lavis.runners.eval_cache import StopFlag
from lavis.runners.evaluation import evaluate_split
from lavis.runners.objective import micro_batch_weights
from lavis.runners.optim import build_lr_schedule, build_optimizer
from lavis.runners.progress import Progress, bar_postfix, train_line
from lavis.runners.run_checkpoints import RunCheckpoints
from lavis.runners.run_config import (
    RunConfig,
    available_splits,
    check_splits,
    check_warmup,
    resolve_best_dataset,
)
from lavis.runners.run_dir import prepare_run_dir, removed_if_refused
from lavis.runners.run_start import open_logs, start_run
from lavis.runners.sample_log import samples_filename, step_tag
from lavis.runners.strategy import build_strategy
from lavis.runners.train_state import config_dict

log = get_logger()


@registry.register_runner("runner_base")
class RunnerBase(RunCheckpoints):
    """Epoch-based runner; see the module docstring. Build it with ``(cfg, task, model, datasets)``."""

    #: The runner's keys of the ``run`` section (validated by the config loader, with the task's).
    Config = RunConfig

    def __init__(self, cfg, task, model, datasets: dict):
        self.cfg = cfg
        # The typed run section (validated by the loader, or here for a config built in code).
        self.run_cfg = run = run_section(cfg.run, type(task).Config, type(self).Config)
        self.task = task
        self.datasets = datasets
        check_split_datasets(datasets)
        check_splits(run, datasets)
        self.best_split = run.best_split or (run.valid_splits[0] if run.valid_splits else None)
        self.best_dataset = None if run.evaluate else resolve_best_dataset(run, datasets, self.best_split)

        def place(dist_info: dist.DistInfo, precision) -> None:
            # Before the run directory exists: a model the strategy refuses (FSDP with a quantised LM or mixed
            # stored dtypes) or one that does not fit the device leaves nothing behind.
            self.strategy = build_strategy(run, precision, dist_info)
            self.model = self.strategy.place(model)

        start = start_run(run, lambda: prepare_run_dir(run, cfg), before_run_dir=place)
        self.dist_info, self.precision, self.paths = start.dist_info, start.precision, start.paths
        # A checkpoint to resume is read and checked against the config now, before anything is logged
        # into its run directory; its weights and optimizer state are loaded once they are built.
        self._resume_state = None
        if self.paths.resume_from is not None and not run.evaluate:
            with removed_if_refused(self.paths, self.dist_info.is_main):
                self._resume_state = self._read_resume_state(self.paths.resume_from)
        self.metrics = open_logs(
            start,
            wandb_cfg=run.wandb,
            tensorboard_dir=self.paths.run_dir / "tensorboard" if run.tensorboard else None,
            run_name=self.paths.run_dir.name,
            config=config_dict(cfg),
        )
        self.best: dict = {"metric": None, "step": None}
        self.schedule = None  # built by train()
        self.total_steps: int | None = None  # planned by train()
        self.global_step = 0
        self._failed = False
        self._closed = False
        log.info(
            "run directory: %s (%d process(es), %s, %s)",
            self.paths.run_dir,
            self.dist_info.world_size,
            self.dist_info.device,
            run.amp,
        )
        self._started = time.time()
        self.progress = Progress(self.dist_info.device)
        provenance.start_invocation(self.paths, cfg, self.dist_info, self.model)  # run_info.json, config history

    # --- planning ---------------------------------------------------------------------------------------

    # Run keys that fix the length of the schedule; a resumed run must not change them (with the keys
    # that fix the data order, see resume_check.py).
    PLAN_KEYS: tuple[str, ...] = ("max_epoch",)

    def plan(self, stream: TrainStream) -> tuple[int, int]:
        """``(steps_per_period, total_steps)``: one period per epoch, ``max_epoch`` epochs."""
        return stream.steps_per_epoch, stream.steps_per_epoch * int(self.run_cfg.max_epoch)

    # --- public API -------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train (or only evaluate when ``run.evaluate``); returns a summary dict.

        ``status`` is "finished", "max_steps" or "preempted" (SIGTERM: a checkpoint was
        saved and the log says how to resume).
        """
        if self.run_cfg.evaluate:
            return self._evaluate_only()
        run = self.run_cfg
        with removed_if_refused(self.paths, self.dist_info.is_main):
            self._set_up_training()
        try:
            status = self._train_loop()
            summary = {
                "status": status,
                "run_dir": str(self.paths.run_dir),
                "step": self.global_step,
                "best": dict(self.best),
            }
            if status == "finished" and run.test_splits:
                summary["test"] = self._final_test()
        except BaseException:
            self._failed = True  # close() then leaves the process group without waiting for the peers
            provenance.finish_invocation(self.paths, self.dist_info, "failed")
            raise
        finally:
            self.metrics.close()
        # Only lines the ranks up: the clean exit is close() (barrier, then destroy the process group),
        # which train.py calls in a finally; a process that exits without it may still cut a peer's receive.
        dist.barrier()
        summary["summary"] = provenance.end_of_run_summary(self, status, self._started)
        provenance.finish_invocation(self.paths, self.dist_info, status, summary["summary"])
        log.info("%s", provenance.format_summary(summary["summary"]))
        return summary

    def _set_up_training(self) -> None:
        """The data stream, the plan, the wrapped model, optimizer, schedule and scaler; the resumed state."""
        run = self.run_cfg
        stream = TrainStream(
            concat_train_datasets(self.datasets, list(run.train_splits)),
            self.task.collator(self.model, "train"),
            batch_size=run.batch_size_train,
            accum=run.accum_grad_iters,
            rank=self.dist_info.rank,
            world_size=self.dist_info.world_size,
            seed=run.seed,
            num_workers=loader_workers(run.num_workers, self.dist_info.device),
            pin_memory=self.dist_info.device.type == "cuda",
            group_by_length=run.group_by_length,
        )
        self.stream = stream
        self.steps_per_period, self.total_steps = self.plan(stream)
        check_warmup(run, self.total_steps)
        # Wrapped first: FSDP replaces the parameters by their shards, which the optimizer must hold.
        self.wrapped_model = self._wrap_ddp(self.model)
        self.optimizer = build_optimizer(self.model, run)
        self.schedule = build_lr_schedule(self.optimizer, run, self.total_steps, self.steps_per_period)
        self.scaler = self.strategy.grad_scaler()
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        # e.g. AdaLoRA's rank re-allocation; None for models without such a hook.
        self._after_step = self.model.optimizer_step_hook()
        if self.paths.resume_from is not None:
            self._resume(self.paths.resume_from)
        else:
            # A first start with resume_ckpt_path=latest may find the metrics of an attempt killed before
            # its first checkpoint: that attempt's steps are redone, so its lines go.
            self.metrics.truncate(0)

    def evaluate(self, split: str, step: int | None = None, epoch: int | None = None) -> dict:
        """Evaluate the current model on ``split`` of every dataset that has it: ``{dataset: metrics}``."""
        results = {}
        found = False
        for name, by_split in self.datasets.items():
            if split not in by_split:
                continue
            found = True
            at_step = self.global_step if step is None else step
            since = time.time()
            metrics = evaluate_split(
                task=self.task,
                model=self.model,
                dataset=by_split[split],
                dataset_name=name,
                split=split,
                dist_info=self.dist_info,
                precision=self.precision,
                batch_size=self.run_cfg.batch_size_eval,
                num_workers=loader_workers(self.run_cfg.num_workers, self.dist_info.device),
                samples_path=self.paths.run_dir / samples_filename(name, step_tag(split, at_step)),
                result_dir=self.paths.results,
            )
            results[name] = metrics
            record = {"epoch": epoch, "step": at_step, "split": split, "dataset": name}
            if self.schedule is not None:
                record["lr"] = self.schedule.base_lr(max(0, self.global_step - 1))
            self.metrics.write({**record, **metrics})
            if self.dist_info.is_main:  # one results file per evaluation, beside the latest
                provenance.keep_results(self.paths.results, since, split, epoch, at_step)
            log.info("eval %s.%s at step %s: %s", name, split, record["step"], format_metrics(metrics))
        if not found:
            raise ConfigError(f"no dataset has the split {split!r}; available: {available_splits(self.datasets)}")
        return results

    def close(self) -> None:
        """Close the logs and leave the process group; idempotent, safe after train() and after an error.

        After a normal end every rank waits for the others before leaving (so none cuts a peer's last
        receive); after an error it leaves at once, as the peers may be dead or blocked elsewhere.
        """
        if self._closed:
            return
        self._closed = True
        self.metrics.close()
        # The DDP reducer holds the process group: drop it before the group is destroyed.
        self.wrapped_model = self.model
        gc.collect()
        dist.destroy(wait=not self._failed)

    # --- the loop ---------------------------------------------------------------------------------------

    def _train_loop(self) -> str:
        run = self.run_cfg
        bar = progress_bar(self.total_steps, self.global_step, self.dist_info.is_main and run.progress_bar)
        # SIGTERM only sets a flag: the loop saves at the next step boundary, agreed by all ranks.
        stop = StopFlag().install()
        self.model.train()  # a model may arrive in eval mode (HF from_pretrained); evaluation restores the mode
        status = "finished"
        try:
            while self.global_step < self.total_steps:
                if run.max_steps is not None and self.global_step >= run.max_steps:
                    status = "max_steps"
                    break
                period = self.global_step // self.steps_per_period
                micro_batches = self.stream.next_step()
                self.progress.count(micro_batches)
                loss, grad_norm, lr = self._optimizer_step(micro_batches)
                self.global_step += 1
                bar.update(1)
                if self.global_step % run.log_freq == 0:
                    self._log_train(period, loss, grad_norm, lr, bar)
                period_end = self.global_step % self.steps_per_period == 0 or self.global_step == self.total_steps
                if period_end:
                    self._end_of_period(period)
                preempted = dist.any_rank(stop.requested)
                reached_max = run.max_steps is not None and self.global_step >= run.max_steps
                if (
                    preempted
                    or reached_max
                    or self.global_step == self.total_steps
                    or (period_end and run.save_epoch_end)
                    or (run.save_freq_steps and self.global_step % run.save_freq_steps == 0)
                ):
                    path = self._save()
                if preempted:
                    log.warning(
                        "SIGTERM: saved %s at step %d; resume with --options run.resume_ckpt_path=latest "
                        "run.output_dir=%s run.run_name=%s",
                        path,
                        self.global_step,
                        run.output_dir,
                        self.paths.run_dir.name,
                    )
                    return "preempted"
                if reached_max and self.global_step < self.total_steps:
                    log.info("run.max_steps=%d reached; continue with run.resume_ckpt_path=%s", run.max_steps, path)
                    return "max_steps"
        finally:
            bar.close()
            stop.uninstall()
        return status

    def _optimizer_step(self, micro_batches: list):
        """Forward/backward over the micro-batches of one step, then clip and step; no host sync.

        Returns this rank's share of the step's loss (summed over ranks it is the step's objective,
        see objective.py), the gradient norm and the lr.
        """
        accum = len(micro_batches)
        world = self.dist_info.world_size
        # Counted on the CPU batches, before they move to the device: the weights need no device sync.
        weights = micro_batch_weights(
            self.run_cfg.loss_reduction, [self.task.loss_count(b) for b in micro_batches], world
        )
        loss_share = None
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            batch = move_to_device(batch, self.dist_info.device)
            last = i == accum - 1
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) once, on the last micro-batch.
            with self.strategy.gradient_sync(self.wrapped_model, last):
                with self.precision.autocast():
                    loss = self.task.train_step(self.wrapped_model, batch) * weight
                # DDP and FSDP average the gradients over ranks: x world makes their sum the objective's gradient.
                self.scaler.scale(loss * world).backward()
            loss_share = loss.detach() if loss_share is None else loss_share + loss.detach()
        self.strategy.finish_gradients(self.trainable)
        lr = self.schedule.step(self.global_step)
        grad_norm = None
        if self.run_cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            grad_norm = self.strategy.clip_grad_norm_(self.trainable, float(self.run_cfg.max_grad_norm))
        scale_before = self._scale_if_needed()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self._after_step is not None and self._step_was_taken(scale_before):
            # AdaLoRA scores ranks from the gradients of this step (unscaled by scaler.step): before zero_grad.
            # A step the fp16 GradScaler skipped had inf/NaN gradients, which would poison its importance
            # averages, so it is not scored.
            self._after_step(self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_share, grad_norm, lr

    def _scale_if_needed(self) -> float | None:
        # get_scale() syncs with the device: only read it when a skipped step changes what happens next.
        if self._after_step is None or not self.scaler.is_enabled():
            return None
        return self.scaler.get_scale()

    def _step_was_taken(self, scale_before: float | None) -> bool:
        # GradScaler.update() lowers the scale exactly when it found inf/NaN gradients and skipped the step.
        return scale_before is None or self.scaler.get_scale() >= scale_before

    def _log_train(self, period: int, loss: torch.Tensor, grad_norm, lr: float, bar) -> None:
        # The only host sync of the loop: once per log_freq steps. The shares of the ranks sum to the loss.
        loss = (dist.all_reduce_mean(loss.float()) * self.dist_info.world_size).item()
        record = {"epoch": period, "step": self.global_step, "split": "train", "lr": lr, "loss": loss}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        # Every rank holds the same datasets (SplitDataset: num_skipped), so every rank joins this collective.
        skipped = sum(d.num_skipped for d in leaf_datasets(self.stream.dataset))
        record["data/num_skipped"] = dist.sum_over_ranks(skipped)
        figures = self.progress.report(self.global_step, self.total_steps)
        self.metrics.write({**record, **figures})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **bar_postfix(figures))
        # Always in log.txt; on the console only without the bar (which shows the same figures).
        log.info("%s", train_line(record, figures), extra={"file_only": self.run_cfg.progress_bar})

    def _end_of_period(self, period: int) -> None:
        run = self.run_cfg
        last = self.global_step == self.total_steps
        if not run.valid_splits or not ((period + 1) % run.val_freq == 0 or last):
            return
        for split in run.valid_splits:
            results = self.evaluate(split, epoch=period)
            if split == self.best_split:
                self._maybe_save_best(results[self.best_dataset], split)

    # --- final / evaluation-only -----------------------------------------------------------------------

    def _final_test(self) -> dict:
        best_path = self.paths.checkpoints / ckpt.BEST_NAME
        if self.run_cfg.valid_splits and best_path.is_file():
            state = self._load_weights(best_path)
            log.info("testing the best checkpoint (step %s)", state.get("step"))
        last_period = (self.global_step - 1) // self.steps_per_period
        return {
            split: self.evaluate(split, step=self.global_step, epoch=last_period) for split in self.run_cfg.test_splits
        }

    def _evaluate_only(self) -> dict:
        run = self.run_cfg
        if self.paths.resume_from is not None:
            with removed_if_refused(self.paths, self.dist_info.is_main):
                self._load_weights(self.paths.resume_from)
        # RunConfig.validate made sure there is a split to evaluate.
        results = {split: self.evaluate(split, step=0) for split in run.test_splits or run.valid_splits}
        self.metrics.close()
        dist.barrier()
        return {"status": "evaluated", "run_dir": str(self.paths.run_dir), "test": results}

    # --- processes -------------------------------------------------------------------------

    def _wrap_ddp(self, model):
        # DDP or FSDP, per run.strategy (the name stays: tests count DDP's all-reduces through it).
        return self.strategy.wrap(model)

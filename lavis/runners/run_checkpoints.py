"""Checkpoints of a training run: save at a step boundary, the best checkpoint, resume, load weights.

``RunCheckpoints`` is the part of ``RunnerBase`` (runner.py) that turns the run's live state into a
``TrainState`` (train_state.py, which owns the checkpoint format) and back. It reads the runner's
``cfg``, ``run_cfg``, ``model``, ``optimizer``, ``schedule``, ``scaler``, ``stream``, ``metrics``, ``paths``,
``strategy``, ``dist_info``, ``best`` and ``global_step``; single-file checkpoints are written by rank 0
(checkpoint.py), sharded ones (``run.strategy=fsdp``) by every rank (sharded_checkpoint.py).
"""

from __future__ import annotations

from lavis.common import dist
from lavis.common.errors import CheckpointError, ConfigError
from lavis.common.logging import get_logger
from lavis.runners import checkpoint as ckpt
from lavis.runners import sharded_checkpoint as sharded
from lavis.runners.train_state import TrainState, config_dict, weights_state

log = get_logger()


class RunCheckpoints:
    """Saving and resuming, mixed into ``RunnerBase`` (see the module docstring for what it reads)."""

    def _maybe_save_best(self, metrics: dict, split: str) -> None:
        key = self.run_cfg.best_metric
        if key not in metrics:
            raise ConfigError(f"run.best_metric: {key!r} is not among the metrics of {split}: {sorted(metrics)}")
        value = float(metrics[key])
        best = self.best["metric"]
        better = best is None or (value > best if self.run_cfg.best_mode == "max" else value < best)
        if not better:
            return
        self.best = {"metric": value, "step": self.global_step}
        weights = self.strategy.gather_trainable_state_dict(self.model)  # a collective under fsdp
        if self.dist_info.is_main:
            ckpt.save_checkpoint(
                self.paths.checkpoints / ckpt.BEST_NAME,
                weights_state(weights, config_dict(self.cfg), self.global_step, dict(self.best, split=split, key=key)),
            )
        log.info("new best %s on %s: %.6g at step %d", key, split, value, self.global_step)

    def _save(self):
        rng_states = dist.gather_objects(ckpt.capture_rng_state())
        if self.strategy.sharded_checkpoints:
            return self._save_sharded(rng_states)
        if not self.dist_info.is_main:
            return None
        state = self._train_state(
            rng_states, model=ckpt.trainable_state_dict(self.model), optimizer=self.optimizer.state_dict()
        )
        path = ckpt.save_checkpoint(ckpt.step_checkpoint_path(self.paths.run_dir, self.global_step), state.state_dict())
        ckpt.prune_step_checkpoints(self.paths.run_dir, self.run_cfg.keep_last)
        return path

    def _save_sharded(self, rng_states):
        # Every rank writes its shards of the weights and optimizer state; rank 0 the rest (run.strategy=fsdp).
        state = self._train_state(rng_states).state_dict() if self.dist_info.is_main else None
        path = sharded.save(
            sharded.step_checkpoint_dir(self.paths.run_dir, self.global_step), self.model, self.optimizer, state
        )
        if self.dist_info.is_main:
            ckpt.prune_step_checkpoints(self.paths.run_dir, self.run_cfg.keep_last)
        dist.barrier()
        return path

    def _train_state(self, rng_states, model=None, optimizer=None) -> TrainState:
        """The run's TrainState at this step boundary (weights and optimizer given for single-file checkpoints)."""
        return TrainState(
            config=config_dict(self.cfg),
            global_step=self.global_step,
            **self.stream.state(),
            metrics_lines=self.metrics.lines,
            scheduler=self.schedule.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_states,
            world_size=self.dist_info.world_size,
            best=dict(self.best),
            model_state=self.model.training_state(),
            model=model,
            optimizer=optimizer,
        )

    def _read_resume_state(self, path) -> TrainState:
        """The TrainState of the checkpoint to resume (a sharded one: its train-state file), checked against
        the config."""
        if path.is_dir():
            if not self.strategy.sharded_checkpoints:
                raise CheckpointError(
                    f"{path}: a sharded checkpoint (written with run.strategy=fsdp); resume it "
                    f"with run.strategy=fsdp, or convert it with lavis.export --format single"
                )
            state = TrainState().load_state_dict(ckpt.load_checkpoint(path / sharded.TRAIN_STATE), path, sharded=True)
        else:
            state = TrainState().load_state_dict(ckpt.load_checkpoint(path), path)
        state.check_resumable(self.cfg, self.PLAN_KEYS, path)
        return state

    def _resume(self, path) -> None:
        state = self._resume_state
        sharded_dir = path.is_dir()
        if sharded_dir:  # the weights and optimizer state are loaded (and re-sharded) from the shards here
            sharded.load(path, self.model, self.optimizer)
        if state.model is not None:
            self.strategy.load_trainable_state_dict(self.model, state.model, str(path))
        try:
            self.model.load_training_state(state.model_state)
        except (AttributeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: its model training state does not fit the model: {err}") from None
        try:
            if state.optimizer is not None:
                self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit (changed run.param_groups?): {err}") from None
        self.schedule.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        self.global_step = state.global_step
        self.stream.seek(state.data_epoch, state.position)
        self.best = state.best
        self.metrics.truncate(state.metrics_lines)
        if state.world_size == self.dist_info.world_size:
            ckpt.restore_rng_state(state.rng[self.dist_info.rank])
        else:
            log.warning(
                "%s was written by %d process(es), resuming with %d: the data order and random streams "
                "differ from the original run%s",
                path,
                state.world_size,
                self.dist_info.world_size,
                "; the sharded weights and optimizer state were re-sharded" if sharded_dir else "",
            )
        log.info("resumed from %s at step %d", path, self.global_step)
        self._resume_state = None  # the weights and optimizer state it held now live in the model and optimizer

    def _load_weights(self, path) -> dict:
        # A single file or a sharded directory, into the model as it is (sharded or not).
        weights, state = sharded.read_weights(path)
        self.strategy.load_trainable_state_dict(self.model, weights, str(path))
        return state

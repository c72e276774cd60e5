"""Everything a checkpoint holds, in one place: ``TrainState`` (step checkpoints) and best-weights files.

A step checkpoint is ``TrainState.state_dict()``: the trainable weights, the optimizer, schedule and
grad-scaler states, every rank's RNG states, the data position, the best metric so far, the model's
non-parameter training state and the resolved config. ``best.pt`` holds the weights, the best
metric, its step and the config. Every file carries ``format_version`` and ``kind``; loading checks
them and names what is missing, so a best.pt given for resuming, or a file of a newer format, is a
clear CheckpointError rather than a KeyError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

from lavis.common.errors import CheckpointError
from lavis.runners.resume_check import check_resume_config

# 2: every file carries ``kind`` and the config (1: best.pt had no config).
FORMAT_VERSION = 2
KIND_TRAINING = "training"
KIND_WEIGHTS = "weights"
_PROGRESS_KEYS = ("global_step", "data_epoch", "position", "metrics_lines")


def config_dict(cfg) -> dict:
    """The resolved config as plain values (what every checkpoint stores under ``config``)."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def check_format(state: dict, source) -> None:
    """A CheckpointError unless ``state`` is of a format this code reads."""
    version = state.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: not a checkpoint of this framework (no format_version)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: written in checkpoint format {version}, newer than this code reads "
            f"({FORMAT_VERSION}); update the code"
        )


@dataclass
class TrainState:
    """The state of a training run at a step boundary (see the module docstring)."""

    config: dict = field(default_factory=dict)
    global_step: int = 0
    data_epoch: int = 0
    position: int = 0  # micro-batches consumed in data_epoch
    metrics_lines: int = 0  # lines of metrics.jsonl written up to this step
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    rng: list = field(default_factory=list)  # one state per rank
    world_size: int = 1
    best: dict = field(default_factory=lambda: {"metric": None, "step": None})
    model_state: dict = field(default_factory=dict)  # the model's non-parameter training state
    # None in the train-state file of a sharded checkpoint (the weights and optimizer are its DCP shards).
    model: Optional[dict] = None
    optimizer: Optional[dict] = None

    def state_dict(self) -> dict:
        """The checkpoint's dict (plain values and tensors only: it loads with ``weights_only=True``)."""
        state = {
            "format_version": FORMAT_VERSION,
            "kind": KIND_TRAINING,
            "config": self.config,
            "progress": {key: getattr(self, key) for key in _PROGRESS_KEYS},
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "rng": self.rng,
            "world_size": self.world_size,
            "best": dict(self.best),
            "model_state": self.model_state,
        }
        if self.model is not None:
            state["model"] = self.model
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        return state

    def load_state_dict(self, state: dict, source="checkpoint", sharded: bool = False) -> TrainState:
        """Fill this TrainState from a checkpoint's dict (``sharded``: weights and optimizer live elsewhere)."""
        check_format(state, source)
        required = ["scheduler", "scaler", "rng", "progress", "world_size"] + (
            [] if sharded else ["model", "optimizer"]
        )
        missing = [key for key in required if key not in state]
        if missing or state.get("kind", KIND_TRAINING) != KIND_TRAINING:
            raise CheckpointError(
                f"{source}: not a training checkpoint (missing {missing}); a best.pt holds only "
                f"weights: evaluate it (run.evaluate=true or evaluate.py --checkpoint)"
            )
        progress = state["progress"]
        lacking = [key for key in _PROGRESS_KEYS if key not in progress]
        if lacking:
            raise CheckpointError(f"{source}: its progress record lacks {lacking}")
        for key in _PROGRESS_KEYS:
            setattr(self, key, int(progress[key]))
        self.config = dict(state.get("config") or {})
        self.scheduler, self.scaler, self.rng = state["scheduler"], state["scaler"], list(state["rng"])
        self.world_size = int(state["world_size"])
        self.best = dict(state.get("best") or self.best)
        self.model_state = dict(state.get("model_state") or {})
        self.model, self.optimizer = state.get("model"), state.get("optimizer")
        return self

    def check_resumable(self, cfg, plan_keys: tuple[str, ...], source) -> None:
        """A CheckpointError naming every key of ``cfg`` that fixes the data order or schedule and changed."""
        check_resume_config(self.config, cfg, plan_keys, source)


def weights_state(model: dict, config: dict, step: int, best: dict) -> dict:
    """The dict of a best-weights file (``best.pt``): weights, the config, the step and the best metric."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": KIND_WEIGHTS,
        "model": model,
        "config": config,
        "step": step,
        "best": best,
    }

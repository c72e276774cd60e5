"""The keys of the ``run`` section that the runners read, with their types and defaults.

The config loader validates YAML against ``RunConfig`` (merged with the task's own
``Config``) and the README's config reference is generated from it: the comment
above each field is its documentation. ``RunConfig.validate`` holds the range and cross-key checks of
these keys (the loader reports them with the schema errors); the checks that need the built datasets
(split names, the best dataset) or the run's length in steps run at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from lavis.common.errors import ConfigError
from lavis.common.schema import Validated


@dataclass
class ParamGroupConfig:
    """One entry of ``run.param_groups``: parameters whose name matches ``match`` get these settings."""

    # Regular expression searched in the parameter's qualified name (e.g. "perceiver\\." or "lora_").
    match: str = ""
    # Multiplies the scheduled learning rate of these parameters (every schedule honours it).
    lr_scale: float = 1.0
    # Weight decay of these parameters; null keeps the default policy (no decay on biases, norms, gates, embeddings).
    weight_decay: Optional[float] = None


@dataclass
class WandbConfig:
    """Weights & Biases logging (``run.wandb``)."""

    # wandb project; null uses "pet-vlm".
    project: Optional[str] = None
    # wandb run name; null uses the run name.
    name: Optional[str] = None
    # disabled (default, nothing is imported), offline (files under the run dir, no network) or online.
    mode: Literal["disabled", "offline", "online"] = "disabled"


@dataclass
class RunConfig(Validated):
    """Every key of the ``run`` section used by ``runner_base`` and ``runner_iter``.

    The run section is this class merged with the task's ``Config`` (``schema.merged_schema``), so
    ``validate`` and ``metric_names`` see the task's keys too.
    """

    # Registered task name (e.g. captioning, vqa); required.
    task: Optional[str] = None
    # Registered runner: runner_base (epochs) or runner_iter (iterations).
    runner: str = "runner_base"
    # auto (cuda when available, else cpu), cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Seed of python, numpy and torch (rank r uses seed + r) and of the data order.
    seed: int = 42
    # Directory under which each run gets its own folder <output_dir>/<run_name>/.
    output_dir: str = "output"
    # Name of the run folder; null uses a timestamp decided on rank 0.
    run_name: Optional[str] = None

    # Number of epochs (runner_base).
    max_epoch: int = 1
    # Total optimizer steps (runner_iter; required there).
    max_iters: Optional[int] = None
    # Optimizer steps per inner epoch, the unit of val_freq and of epoch-end checkpoints (runner_iter).
    iters_per_inner_epoch: Optional[int] = None
    # Stop after this many optimizer steps (a checkpoint is saved there); the lr schedule keeps its full length.
    max_steps: Optional[int] = None

    # Training batch size per process (the global batch is this x number of processes x accum_grad_iters).
    batch_size_train: int = 8
    # Evaluation batch size per process.
    batch_size_eval: int = 8
    # DataLoader worker processes per rank; null = 0 on the CPU, on a GPU the rank's share of the CPUs less one
    # (1 to 8). Bitwise resume with random augmentations needs 0.
    num_workers: Optional[int] = None
    # Micro-batches per optimizer step; gradients are all-reduced only on the last one.
    accum_grad_iters: int = 1
    # Batch training samples of similar size (number of images, so of demonstrations with train_max_shots)
    # together: less padding, same set per step for any split over processes (lavis.runners.data).
    group_by_length: bool = False

    # Registered lr schedule, stepped per optimizer step: linear_warmup_cosine_lr, linear_warmup_step_lr or constant_lr.
    lr_sched: str = "linear_warmup_cosine_lr"
    # Peak learning rate (reached at the end of warmup).
    init_lr: float = 1e-4
    # Final learning rate of the cosine schedule and floor of the step schedule.
    min_lr: float = 0.0
    # Learning rate at step 0 of the linear warmup.
    warmup_lr: float = 0.0
    # Optimizer steps of linear warmup (0 = none).
    warmup_steps: int = 0
    # linear_warmup_step_lr: the lr is multiplied by this every lr_decay_steps steps.
    lr_decay_rate: float = 0.1
    # linear_warmup_step_lr: optimizer steps between decays; null = one epoch (runner_base) or inner epoch.
    lr_decay_steps: Optional[int] = None

    # AdamW weight decay of the parameters that decay (not biases, norms, gates, embeddings).
    weight_decay: float = 0.05
    # AdamW beta1.
    beta1: float = 0.9
    # AdamW beta2.
    beta2: float = 0.999
    # AdamW epsilon.
    eps: float = 1e-8
    # Per-parameter settings, first match wins: list of {match: regex, lr_scale, weight_decay}.
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    # token: a step's loss is the mean over every target token of the global batch (all processes and
    # micro-batches), so any split of the batch trains the same objective; sequence: each micro-batch's
    # own token mean, averaged equally over micro-batches and processes (the behaviour of LAVIS).
    loss_reduction: Literal["token", "sequence"] = "token"
    # Clip the global gradient norm to this value; null or 0 = no clipping.
    max_grad_norm: Optional[float] = 1.0
    # Precision: fp32, fp16 (CUDA only, with a GradScaler) or bf16 (CPU, or a GPU that supports it).
    amp: Literal["fp32", "fp16", "bf16"] = "fp32"
    # DDP: let parameters receive no gradient in a step (slower; only when the model needs it).
    find_unused_parameters: bool = False
    # ddp: every process holds the whole model (best while it fits one device); fsdp: FSDP2 shards weights,
    # gradients and optimizer state over the processes, and step checkpoints become sharded directories
    # checkpoints/step_<N>/ (README "Scaling out"). Full fine-tuning of the LM: model.trainable.lang_encoder=true.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: free each unit's gathered weights after its forward (less memory; gathered again in backward).
    fsdp_reshard_after_forward: bool = True
    # fsdp: shard the vision tower's blocks as units; null = when it trains or has >= 100M parameters.
    fsdp_shard_vision: Optional[bool] = None

    # Splits used for training (their datasets are concatenated).
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    # Splits evaluated every val_freq epochs.
    valid_splits: list[str] = field(default_factory=list)
    # Splits evaluated at the end of training, with the best checkpoint when there are valid_splits.
    test_splits: list[str] = field(default_factory=list)
    # Evaluate every this many epochs (inner epochs for runner_iter) and after the last one.
    val_freq: int = 1
    # Split whose metric chooses the best checkpoint; null = the first of valid_splits.
    best_split: Optional[str] = None
    # Dataset whose best_split metric chooses the best checkpoint; null = the only dataset with that split
    # (required when several datasets have it).
    best_dataset: Optional[str] = None
    # Metric that chooses the best checkpoint.
    best_metric: str = "agg_metrics"
    # max: higher is better; min: lower is better.
    best_mode: Literal["max", "min"] = "max"
    # Evaluation only: evaluate test_splits (or valid_splits when empty) with the weights of resume_ckpt_path.
    evaluate: bool = False

    # Continue a run: a checkpoint path, or "latest" (the newest checkpoint of output_dir/run_name).
    resume_ckpt_path: Optional[str] = None
    # Save a checkpoint every this many optimizer steps (0 = only at epoch ends).
    save_freq_steps: int = 0
    # Save a checkpoint at the end of every epoch (inner epoch for runner_iter).
    save_epoch_end: bool = True
    # Keep this many step checkpoints (older ones are deleted; best.pt is kept apart).
    keep_last: int = 2

    # Log (and sync the loss to the CPU) every this many optimizer steps.
    log_freq: int = 50
    # Show a tqdm progress bar on rank 0.
    progress_bar: bool = True
    # Weights & Biases logging.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Write TensorBoard event files under <run dir>/tensorboard.
    tensorboard: bool = False
    # Timeout of collective operations, in seconds (a hung rank fails instead of waiting forever).
    dist_timeout_s: int = 1800

    def metric_names(self) -> list[str] | None:
        """The metrics the task's ``evaluate`` returns (its Config says them); None: no task, unknown."""
        return None

    def validate(self, path: str) -> list[str]:
        problems = super().validate(path)

        def at_least(key: str, low) -> None:
            value = getattr(self, key)
            if value is not None and value < low:
                problems.append(f"{path}.{key}: must be >= {low}{' or null' if key in _OPTIONAL else ''}, got {value}")

        for key in _AT_LEAST_1:
            at_least(key, 1)
        for key in _AT_LEAST_0:
            at_least(key, 0)
        problems += self.length_problems(path)
        if 0 <= self.init_lr < self.min_lr:
            problems.append(f"{path}.min_lr: must be <= {path}.init_lr ({self.init_lr}), got {self.min_lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                problems.append(f"{path}.{key}: must be in [0, 1), got {getattr(self, key)}")
        for key in ("eps", "lr_decay_rate"):
            if getattr(self, key) <= 0:
                problems.append(f"{path}.{key}: must be > 0, got {getattr(self, key)}")
        if self.evaluate and not (self.test_splits or self.valid_splits):
            problems.append(f"{path}.evaluate: true needs {path}.test_splits or {path}.valid_splits to evaluate")
        if self.best_split is not None and self.best_split not in self.valid_splits:
            problems.append(
                f"{path}.best_split: {self.best_split!r} is not one of {path}.valid_splits {self.valid_splits}"
            )
        names = self.metric_names()
        if names is not None and self.valid_splits and not self.evaluate and self.best_metric not in names:
            problems.append(
                f"{path}.best_metric: {self.best_metric!r} is not a metric of task {self.task!r}; "
                f"choose one of {', '.join(names)}"
            )
        output_dir = Path(self.output_dir).expanduser()
        if output_dir.exists() and not output_dir.is_dir():
            problems.append(f"{path}.output_dir: {self.output_dir} exists and is not a directory")
        return problems

    def length_problems(self, path: str) -> list[str]:
        """The keys that set the run's length (runner_base: epochs)."""
        if not self.evaluate and self.max_epoch < 1:
            return [f"{path}.max_epoch: must be >= 1, got {self.max_epoch}"]
        return []


@dataclass
class IterRunConfig(RunConfig):
    """``runner_iter``'s run keys: those of ``RunConfig``, its length set by ``max_iters``."""

    def length_problems(self, path: str) -> list[str]:
        if self.evaluate:
            return []
        if self.max_iters is None:
            return [f"{path}.max_iters: runner_iter needs the number of optimizer steps"]
        if self.warmup_steps > self.max_iters >= 1:
            return [
                f"{path}.warmup_steps: {self.warmup_steps} is longer than the run ({path}.max_iters={self.max_iters})"
            ]
        return []


_AT_LEAST_1 = ("accum_grad_iters", "log_freq", "val_freq", "batch_size_train", "batch_size_eval", "keep_last")
_AT_LEAST_1 += ("dist_timeout_s", "max_steps", "max_iters", "iters_per_inner_epoch", "lr_decay_steps")
_AT_LEAST_0 = ("save_freq_steps", "num_workers", "warmup_steps", "init_lr", "min_lr", "warmup_lr", "weight_decay")
_AT_LEAST_0 += ("max_grad_norm",)
_OPTIONAL = ("max_steps", "max_iters", "iters_per_inner_epoch", "lr_decay_steps", "num_workers")


def check_warmup(run, total_steps: int) -> None:
    """``run.warmup_steps`` within the run, once its length in steps is known (before the first step)."""
    if int(run.warmup_steps) > total_steps:
        raise ConfigError(
            f"run.warmup_steps: {run.warmup_steps} is longer than the run ({total_steps} optimizer steps); lower it"
        )


def available_splits(datasets: dict) -> list[str]:
    """``dataset.split`` of every split the datasets hold, sorted."""
    return sorted(f"{name}.{split}" for name, by_split in datasets.items() for split in by_split)


def check_splits(run, datasets: dict) -> None:
    """Every split the run names exists somewhere: a typo fails at start-up, not after the first epoch."""
    present = {split for by_split in datasets.values() for split in by_split}
    keys = ("valid_splits", "test_splits") if run.evaluate else ("train_splits", "valid_splits", "test_splits")
    problems = [
        f"run.{key}: no dataset has the split {split!r}"
        for key in keys
        for split in getattr(run, key)
        if split not in present
    ]
    if problems:
        raise ConfigError(f"{'; '.join(problems)}; available: {available_splits(datasets)}")


def resolve_best_dataset(run, datasets: dict, best_split: str | None) -> str | None:
    """The dataset whose ``best_split`` metrics choose the best checkpoint (None without a best split).

    ``run.best_dataset`` when given (it must have the split); otherwise the only dataset
    with the split. Several candidates and no choice is a ConfigError at start-up:
    silently taking one of them would pick the best checkpoint on an arbitrary dataset.
    """
    if best_split is None:
        return None
    candidates = [name for name, by_split in datasets.items() if best_split in by_split]
    if run.best_dataset is not None:
        if run.best_dataset not in candidates:
            raise ConfigError(
                f"run.best_dataset: {run.best_dataset!r} has no split {best_split!r} (run.best_split); "
                f"datasets with it: {candidates}"
            )
        return run.best_dataset
    if len(candidates) > 1:
        raise ConfigError(
            f"run.best_dataset: several datasets have the split {best_split!r} that chooses the best checkpoint "
            f"({candidates}); set run.best_dataset to one of them"
        )
    return candidates[0] if candidates else None

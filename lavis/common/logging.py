"""Run logging: the console and log.txt, metrics.jsonl, wandb and TensorBoard, a tqdm bar.

Only rank 0 writes files and shows progress; the other ranks log warnings to the
console with their rank in front. wandb and TensorBoard are imported only when
enabled, so a default run needs neither network nor their start-up cost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from lavis.common.fileio import atomic_write_text

LOGGER_NAME = "lavis"
_HANDLER_TAG = "_lavis_run_handler"


def get_logger() -> logging.Logger:
    """The package logger (handlers are attached by ``setup_logging``)."""
    return logging.getLogger(LOGGER_NAME)


def setup_logging(rank: int, log_file: str | os.PathLike | None = None) -> logging.Logger:
    """Console handler on every rank (INFO on rank 0, WARNING elsewhere) and ``log_file`` on rank 0.

    Calling it again replaces the handlers of an earlier call, so several runs in one
    process (tests, notebooks) do not log twice.
    """
    logger = get_logger()
    close_logging()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    # ``extra={"file_only": True}``: for log.txt, not the console (e.g. loss lines while the bar shows them).
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    setattr(console, _HANDLER_TAG, True)
    logger.addHandler(console)
    if rank == 0 and log_file is not None:
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        setattr(file_handler, _HANDLER_TAG, True)
        logger.addHandler(file_handler)
    return logger


def close_logging() -> None:
    """Detach and close the handlers added by ``setup_logging``."""
    logger = get_logger()
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()


def _jsonable(value):
    """Plain JSON values; NaN/inf become strings so the file stays valid JSON."""
    if hasattr(value, "item") and callable(value.item):  # a torch or numpy scalar (third-party)
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and mirrors it to wandb / TensorBoard.

    Each line is written in one call and flushed, so a kill leaves at most the last
    line incomplete; ``truncate(n)`` (used on resume) keeps exactly the first n lines.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        enabled: bool = True,
        wandb_cfg=None,
        tensorboard_dir=None,
        run_name: str = "",
        config: dict | None = None,
    ):
        self.path = Path(path)
        self.enabled = enabled
        self.lines = 0
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            self.lines = len(self._read_lines())
        mode = wandb_cfg.mode if wandb_cfg is not None else "disabled"
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.project or "pet-vlm",
                name=wandb_cfg.name or run_name,
                mode=mode,
                dir=str(self.path.parent),
                config=config,
            )
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def _read_lines(self) -> list[str]:
        with open(self.path, encoding="utf-8") as f:
            return [line for line in f.read().splitlines(keepends=True) if line.endswith("\n")]

    def truncate(self, num_lines: int) -> None:
        """Keep the first ``num_lines`` complete lines (atomically), dropping what a resumed run redoes."""
        if not self.enabled or not self.path.exists():
            self.lines = 0 if self.enabled else self.lines
            return
        kept = self._read_lines()[:num_lines]
        atomic_write_text(self.path, "".join(kept))
        self.lines = len(kept)

    def write(self, record: dict) -> None:
        """Append ``record`` (rank 0 only; other ranks' MetricsLog is disabled)."""
        if not self.enabled:
            return
        record = _jsonable(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        self.lines += 1
        step = record.get("step")
        scalars = {}
        prefix = record.get("split", "train")
        if record.get("dataset"):
            prefix = f"{record['dataset']}/{prefix}"
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"{prefix}/{key}"] = value
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        """Flush and close wandb / TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def format_metrics(metrics: dict) -> str:
    """``key=value, ...`` for a log line (floats to 4 significant digits)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def metric_name(run, dataset) -> str:
    """What a split's ``agg_metrics`` is, for tables: "VQA accuracy" for VQA data, else the task's label of it
    (``run`` is the typed run section; its task Config's ``agg_metric_label``, e.g. captioning's agg_metric)."""
    if dataset.sample_id_key == "question_id":
        return "VQA accuracy"
    return run.agg_metric_label()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """A tqdm bar on rank 0 (``enabled``), a do-nothing stand-in elsewhere."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


# Deprecation warnings raised inside third-party code about its own internals, not about our calls:
# harmless, and printed once per rank they bury the run's own messages.
_HARMLESS_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers 5, when peft inspects a model
)


def quiet_third_party_warnings() -> None:
    """Filter the harmless third-party deprecation warnings of ``_HARMLESS_WARNINGS`` (idempotent)."""
    import warnings

    for category, message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

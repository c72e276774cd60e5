"""The run directory ``<output_dir>/<run_name>/`` and which checkpoint a run resumes from.

The name is decided on rank 0 (``run.run_name`` or a timestamp) and broadcast, so
every rank agrees even when their clocks straddle a second. A directory that
exists is never written into, except by resuming the run it holds.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lavis.common import dist
from lavis.common.errors import CheckpointError, ConfigError, UserError
from lavis.common.fileio import atomic_write_text
from lavis.common.logging import close_logging, get_logger
from lavis.runners.checkpoint import CHECKPOINT_DIR, find_latest_checkpoint, remove_stale_temporaries

RESULTS_DIR = "results"


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes, and the checkpoint it starts from (None for a fresh run)."""

    run_dir: Path
    resume_from: Path | None
    #: This run made the directory (it did not exist before): a run refused at start-up removes it.
    created: bool = False

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def results(self) -> Path:
        return self.run_dir / RESULTS_DIR

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.run_dir / "log.txt"


def _run_dir_and_resume_checkpoint(run_cfg) -> tuple[Path, Path | None]:
    output_dir = Path(run_cfg.output_dir).expanduser().resolve()
    resume = run_cfg.resume_ckpt_path
    if resume and not run_cfg.evaluate:
        if resume == "latest":
            if not run_cfg.run_name:
                raise ConfigError("run.resume_ckpt_path=latest needs run.run_name (the run folder to continue)")
            run_dir = output_dir / run_cfg.run_name
            # The same command serves the first start and every requeue: with no checkpoint yet (a job
            # killed before its first save, or never started) the run starts from scratch in run_dir.
            latest = find_latest_checkpoint(run_dir)
            if latest is None:
                get_logger().info(
                    "run.resume_ckpt_path=latest: no checkpoint in %s yet; starting the run from scratch there",
                    run_dir / CHECKPOINT_DIR,
                )
            return run_dir, latest
        ckpt = Path(resume).expanduser().resolve()
        if not ckpt.is_file():
            raise CheckpointError(f"run.resume_ckpt_path: {ckpt} does not exist")
        if ckpt.parent.name == CHECKPOINT_DIR:
            # A checkpoint of one of our runs: continue writing into that run.
            return ckpt.parent.parent, ckpt
        return _fresh_dir(output_dir, run_cfg.run_name), ckpt
    if resume:
        # Evaluation only: the checkpoint supplies weights; results go to a fresh folder.
        if resume == "latest":
            raise ConfigError("run.resume_ckpt_path: with run.evaluate=true give the checkpoint's path, not 'latest'")
        ckpt = Path(resume).expanduser().resolve()
        if not ckpt.is_file():
            raise CheckpointError(f"run.resume_ckpt_path: {ckpt} does not exist")
        return _fresh_dir(output_dir, run_cfg.run_name), ckpt
    return _fresh_dir(output_dir, run_cfg.run_name), None


def _fresh_dir(output_dir: Path, run_name: str | None) -> Path:
    if run_name:
        run_dir = output_dir / run_name
        if run_dir.exists():
            raise ConfigError(
                f"run.run_name: {run_dir} already exists and is never overwritten; choose another run.run_name, "
                f"or continue that run with run.resume_ckpt_path=latest"
            )
        return run_dir
    stamp = time.strftime("%Y%m%d_%H%M%S")
    run_dir, n = output_dir / stamp, 1
    while run_dir.exists():
        run_dir, n = output_dir / f"{stamp}_{n}", n + 1
    return run_dir


def prepare_run_dir(run_cfg, cfg) -> RunPaths:
    """Decide the run directory on rank 0, create it there and tell every rank (errors included)."""
    outcome = None
    if dist.is_main_process():
        try:
            run_dir, resume_from = _run_dir_and_resume_checkpoint(run_cfg)
            created = not run_dir.exists()
            for sub in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / RESULTS_DIR):
                sub.mkdir(parents=True, exist_ok=True)
            # Left by writes that a kill interrupted (for the 9B model each is gigabytes); nothing writes now.
            for stale in remove_stale_temporaries(run_dir):
                get_logger().info("removed the temporary file of an interrupted write: %s", stale)
            if resume_from is None or resume_from.parent.parent != run_dir:
                save_config(run_dir / "config.yaml", cfg)
            outcome = {"paths": (str(run_dir), str(resume_from) if resume_from else None, created)}
        except (ConfigError, CheckpointError) as err:
            outcome = {"error": err}
        except OSError as err:
            # Permission, full disk, a file in the way: the other ranks wait on the broadcast, so it must
            # become an error every rank raises rather than rank 0's traceback.
            where = err.filename or run_cfg.output_dir
            outcome = {
                "error": ConfigError(
                    f"run.output_dir: cannot create the run directory under {run_cfg.output_dir!r}: "
                    f"{where}: {err.strerror or err}"
                )
            }
    outcome = dist.broadcast_object(outcome)
    if "error" in outcome:
        raise outcome["error"]
    run_dir, resume_from, created = outcome["paths"]
    return RunPaths(Path(run_dir), Path(resume_from) if resume_from else None, created)


def save_config(path: Path, cfg) -> None:
    """The resolved config as YAML, written atomically."""
    text = (
        OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else OmegaConf.to_yaml(OmegaConf.create(cfg))
    )
    atomic_write_text(path, text)


@contextlib.contextmanager
def removed_if_refused(paths: RunPaths, is_main: bool) -> Iterator[None]:
    """Start-up work of a run: a user error in it removes the run directory this run created (nothing ran
    yet, so nothing is lost), never the directory of a run it continues."""
    try:
        yield
    except UserError:
        if paths.created and is_main:
            close_logging()  # log.txt is open in there
            shutil.rmtree(paths.run_dir, ignore_errors=True)
        raise

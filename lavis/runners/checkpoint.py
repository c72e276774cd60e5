"""Checkpoint files: atomic writes, safe loads, RNG states, finding the latest, pruning.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``; a file that needs pickled code is refused.
Writes go through ``lavis.common.fileio.atomic_write_bytes``: a kill at any moment
leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lavis.common.errors import CheckpointError
from lavis.common.fileio import atomic_write_bytes
from lavis.common.logging import get_logger
from lavis.runners.checkpoint_integrity import (
    INTEGRITY_KEY,
    check_archive,
    check_digest,
    content_digest,
    refuse_code,
)
from lavis.runners.train_state import FORMAT_VERSION  # noqa: F401 - the version of every file written here

if TYPE_CHECKING:  # lavis.models imports the model stack (transformers, open_clip)
    from lavis.models.base import TrainableModel

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
# A single file step_<N>.pt, or a sharded directory step_<N>/ (run.strategy=fsdp, sharded_checkpoint.py).
_STEP_FILE = re.compile(r"^step_(\d+)(\.pt)?$")
# lavis.common.fileio's temporaries: ".<name>.<random>.tmp" (files) and ".<name>.tmp-<random>" (directories).
_TEMPORARY = re.compile(r"^\..+(\.tmp|\.tmp-[^/]+)$")


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Serialise ``state`` with its content hash (``integrity``) and write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save({**state, INTEGRITY_KEY: {"sha256": content_digest(state)}}, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` on the CPU, after checking that it is intact and safe.

    Every failure is a CheckpointError naming the file: missing, truncated or foreign (not a torch zip),
    a zip CRC mismatch, pickled code (``PickledCodeError``: refused before anything is unpickled), a
    content hash that does not match, or anything but a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with check_archive(path) as archive:
        refuse_code(path, archive)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle a file that passed the checks above is damage
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a checkpoint must hold a dict, found {type(state).__name__}")
    check_digest(path, state)
    state.pop(INTEGRITY_KEY, None)
    return state


def step_checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/checkpoints/step_<step>.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


# A sharded step directory (sharded_checkpoint.py): DCP's shards, its index and the training state.
TRAIN_STATE = "train_state.pt"
DCP_METADATA = ".metadata"  # DCP's index, written last by the coordinator rank


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a complete sharded checkpoint directory (DCP index and training state present)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / TRAIN_STATE).is_file()


def list_step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the step checkpoints (files or sharded directories) of a run, oldest first.

    Temporary files and incomplete directories are ignored.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_FILE.match(entry.name)
        if match and (entry.is_file() if match.group(2) else is_sharded_checkpoint(entry)):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def verify_checkpoint(path: Path) -> None:
    """A CheckpointError unless ``path`` loads (a sharded directory: its train-state file)."""
    load_checkpoint(path / TRAIN_STATE if path.is_dir() else path)


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest step checkpoint of a run that verifies; None when the run has no checkpoint yet.

    A newer one that fails its checks (damaged, truncated) is skipped with a warning naming it; when
    every checkpoint fails, a CheckpointError lists them (starting over would silently lose the run).
    """
    found = list_step_checkpoints(run_dir)
    failures = []
    for _step, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        if failures:
            get_logger().warning(
                "run.resume_ckpt_path=latest: skipped %d newer checkpoint(s) that fail their "
                "checks, falling back to %s:\n  %s",
                len(failures),
                path,
                "\n  ".join(failures),
            )
        return path
    if failures:
        raise CheckpointError(
            "run.resume_ckpt_path=latest: no checkpoint of the run verifies:\n  - " + "\n  - ".join(failures)
        )
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest step checkpoint of a run that verifies; a CheckpointError when there is none."""
    path = find_latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(
            f"run.resume_ckpt_path=latest: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR} "
            f"(set run.output_dir and run.run_name to the run to resume)"
        )
    return path


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and directories of interrupted writes in ``<run_dir>/checkpoints``.

    Only called where no write can be in progress: at start-up, and by rank 0 right after its own save.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    stale = [entry for entry in directory.iterdir() if _TEMPORARY.match(entry.name)]
    for entry in stale:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale


def prune_step_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints; returns the deleted paths."""
    found = list_step_checkpoints(run_dir)
    doomed = [path for _, path in found[: max(0, len(found) - max(1, keep_last))]]
    remove_stale_temporaries(run_dir)
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return doomed


# --- RNG states -------------------------------------------------------------------------------------------
# numpy's state holds an ndarray, which weights_only loading refuses; it is stored as a tensor instead.


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """This process's python, numpy, torch and CUDA generator states, as plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model weights ----------------------------------------------------------------------------------------


def trainable_state_dict(model: TrainableModel) -> dict[str, torch.Tensor]:
    """CPU copies of the model's ``trainable_state_dict()`` (the parameters that train)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in model.trainable_state_dict().items()}


def load_trainable_state_dict(model: TrainableModel, sd: dict, source: str) -> None:
    """The model's strict ``load_trainable_state_dict``, its errors naming ``source``."""
    try:
        model.load_trainable_state_dict(sd)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{source}: the weights do not fit the model: {err}") from None

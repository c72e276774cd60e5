"""Checkpoint files: atomic writes, safe loads, RNG states, finding the latest, pruning.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``; a file that needs pickled code is refused.
Writes go through ``lavis.common.fileio.atomic_write_bytes``: a kill at any moment
leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lavis.common.errors import CheckpointError
from lavis.common.fileio import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
# A single file step_<N>.pt, or a sharded directory step_<N>/ (run.strategy=fsdp, sharded_checkpoint.py).
_STEP_FILE = re.compile(r"^step_(\d+)(\.pt)?$")
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Serialise ``state`` and write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` on the CPU, refusing pickled code or objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file)") from None
        raise CheckpointError(
            f"{path}: refused to load: the file holds a pickled Python object or code ({found.group(1)}), not only "
            f"tensors and plain values; only weights-only checkpoints (as this framework writes) are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a checkpoint must hold a dict, found {type(state).__name__}")
    return state


def step_checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/checkpoints/step_<step>.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the step checkpoints (files or sharded directories) of a run, oldest first.

    Temporary files and incomplete directories are ignored.
    """
    from lavis.runners.sharded_checkpoint import is_sharded_checkpoint

    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_FILE.match(entry.name)
        if match and (entry.is_file() if match.group(2) else is_sharded_checkpoint(entry)):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest step checkpoint of a run; a CheckpointError when there is none."""
    found = list_step_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"run.resume_ckpt_path=latest: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR} "
            f"(set run.output_dir and run.run_name to the run to resume)"
        )
    return found[-1][1]


def prune_step_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints; returns the deleted paths."""
    found = list_step_checkpoints(run_dir)
    doomed = [path for _, path in found[: max(0, len(found) - max(1, keep_last))]]
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


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (the model's own ``trainable_state_dict`` when it has one), on the CPU."""
    if hasattr(model, "trainable_state_dict"):
        sd = model.trainable_state_dict()
    else:
        sd = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().to("cpu", copy=True) for name, t in sd.items()}


def load_weights(model: torch.nn.Module, path) -> dict:
    """Load the trainable weights of a checkpoint (a step checkpoint or best.pt) into ``model``; the state."""
    state = load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"{path}: holds no 'model' weights")
    load_trainable_state_dict(model, state["model"], str(path))
    return state


def load_trainable_state_dict(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Load trainable weights, strictly on the names of the trainable parameters."""
    if hasattr(model, "load_trainable_state_dict"):
        try:
            model.load_trainable_state_dict(sd)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{source}: the weights do not fit the model: {err}") from None
        return
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not fit the model's trainable parameters: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, value in sd.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"{source}: parameter {name} has shape {tuple(value.shape)} in the checkpoint, "
                    f"{tuple(params[name].shape)} in the model"
                )
            params[name].copy_(value)

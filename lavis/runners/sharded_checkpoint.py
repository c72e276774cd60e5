"""Sharded step checkpoints (``run.strategy: fsdp``): one directory ``checkpoints/step_<N>/`` per step.

Written with ``torch.distributed.checkpoint`` (DCP): each rank writes its shards of the trainable weights
and of the optimizer state (frozen weights are not saved; they come from the model's config), and rank 0
adds ``train_state.pt``: the rest of the training state as in a single-file checkpoint (schedule, scaler,
every rank's RNG state, data position, best metric, config). The directory is filled under a temporary
name and renamed when complete (``lavis.common.fileio.atomic_directory``), so a kill during a write leaves
the previous checkpoint loadable and no half directory under a ``step_<N>`` name.

DCP re-shards on load: a checkpoint written by N processes resumes on M (or on one, unwrapped).
``consolidate`` turns a directory into a single-file checkpoint of full trainable weights (what
``python -m lavis.export --format single`` writes, and what the other export formats read).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lavis.common import dist
from lavis.common.errors import CheckpointError
from lavis.common.fileio import atomic_directory
from lavis.runners import checkpoint as ckpt
from lavis.runners.checkpoint import DCP_METADATA, TRAIN_STATE, is_sharded_checkpoint

# Only the parameters that train: the frozen LM is rebuilt from its config, as for single-file checkpoints.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading leaves the frozen weights as built; _check_keys makes sure every trainable one is in the checkpoint.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def step_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/checkpoints/step_<step>/`` (the sharded sibling of ``checkpoint.step_checkpoint_path``)."""
    return Path(run_dir) / ckpt.CHECKPOINT_DIR / f"step_{step:08d}"


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def save(directory: str | os.PathLike, model: nn.Module, optimizer, train_state: dict | None) -> Path:
    """Write a sharded checkpoint; every rank calls it, ``train_state`` is only read on rank 0."""
    directory = Path(directory)
    state = {
        "model": _trainable_model_state(model),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_OPTIONS),
    }
    if not dist.is_main_process():
        tmp = dist.broadcast_object(None)
        dcp.save(state, checkpoint_id=tmp)
        dist.barrier()  # rank 0 renames the directory
        return directory
    with atomic_directory(directory) as tmp:
        dist.broadcast_object(tmp)
        # Returns on the coordinator once every rank's files and the index are written.
        dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
        ckpt.save_checkpoint(Path(tmp) / TRAIN_STATE, {**train_state, "sharded": True})
    dist.barrier()
    return directory


def load(directory: str | os.PathLike, model: nn.Module, optimizer) -> dict:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` (re-sharding as needed); its training state."""
    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a complete sharded checkpoint (no {DCP_METADATA} or {TRAIN_STATE})")
    train_state = ckpt.load_checkpoint(directory / TRAIN_STATE)
    state = {
        "model": _trainable_model_state(model),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_OPTIONS),
    }
    _check_keys(directory, state["model"])
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=not _distributed())
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: does not fit the model and optimizer: {err}") from None
    set_model_state_dict(model, state["model"], options=_LOAD_OPTIONS)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_OPTIONS)
    return train_state


def _trainable_model_state(model: nn.Module) -> dict:
    # ignore_frozen_params filters by named_parameters(), which lists a tied weight once: the other name of a
    # frozen tied weight (a tied LM head) would still be saved. Only trainable parameter names are kept.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model, options=_OPTIONS).items() if k in trainable}


def _stored_tensors(directory: Path, prefix: str) -> dict[str, object]:
    # DCP's index: flattened keys ("model.<parameter name>", "optimizer.state.<name>.exp_avg", ...).
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return {
        key[len(prefix) :]: meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }


def _check_keys(directory: Path, model_sd: dict) -> None:
    stored = _stored_tensors(directory, "model.")
    missing, unexpected = sorted(set(model_sd) - set(stored)), sorted(set(stored) - set(model_sd))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: its weights do not fit the model's trainable parameters: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def load_full_tensors(directory: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor stored under ``prefix`` in full (unsharded), on the CPU, in one process.

    ``model.`` gives the trainable weights by parameter name, ``optimizer.state.`` the optimizer
    state as ``<parameter name>.<exp_avg|exp_avg_sq|step>``.
    """
    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a complete sharded checkpoint (no {DCP_METADATA} or {TRAIN_STATE})")
    state = {
        prefix + name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in _stored_tensors(directory, prefix).items()
    }
    with warnings.catch_warnings():  # DCP warns that it assumes one process, which is what is asked here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return {key[len(prefix) :]: t for key, t in state.items()}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(full trainable weights, the rest of the state)`` of a single-file or sharded checkpoint."""
    path = Path(path)
    if path.is_dir():
        return load_full_tensors(path), ckpt.load_checkpoint(path / TRAIN_STATE)
    state = ckpt.load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"{path}: holds no 'model' weights")
    return state["model"], state


def consolidate(sharded_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Write a single-file checkpoint (``<sharded_dir>-consolidated.pt`` by default) from a sharded one; its path.

    A weights file like ``best.pt``: the full trainable weights, the run's config, the step and the best
    metric, no optimizer state. It serves evaluation and every export format; training resumes from the
    directory itself.
    """
    from lavis.runners.train_state import weights_state

    sharded_dir = Path(sharded_dir)
    if not is_sharded_checkpoint(sharded_dir):
        raise CheckpointError(f"{sharded_dir}: not a complete sharded checkpoint (no {DCP_METADATA} or {TRAIN_STATE})")
    out = Path(out_path) if out_path is not None else sharded_dir.with_name(sharded_dir.name + "-consolidated.pt")
    train_state = ckpt.load_checkpoint(sharded_dir / TRAIN_STATE)
    step = int(train_state["progress"]["global_step"])
    state = weights_state(
        load_full_tensors(sharded_dir), train_state.get("config") or {}, step, dict(train_state.get("best") or {})
    )
    return ckpt.save_checkpoint(out, state)

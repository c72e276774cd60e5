"""Any checkpoint a user may hold, resolved to (the model it was trained as, the weights to load).

Accepted (``resolve_checkpoint``):
- a training checkpoint of ours: ``checkpoints/step_*.pt``, a sharded ``checkpoints/step_*/`` directory
  (``run.strategy: fsdp``) or ``checkpoints/best.pt``. The model section
  comes from the checkpoint's ``config``; a file without one (best.pt of older runs) takes it from its
  run directory's ``config.yaml``;
- a run directory: its ``checkpoints/best.pt``, else its newest ``step_*.pt``;
- a peft adapter directory (``adapter_config.json``): the LM adapter, applied to the configured model;
  one written by ``python -m lavis.export`` also carries the model section and the trained
  perceiver / cross-attention (``flamingo_trainable.safetensors``);
- an OpenFlamingo ``checkpoint.pt`` (a flat dict of tensors in the release's key layout): it is the
  configured model's ``model.pretrained_checkpoint_path``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from lavis.common.errors import CheckpointError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MODEL_SECTION = "petvlm_model.yaml"  # the resolved model section, beside an exported adapter
FLAMINGO_TRAINABLE = "flamingo_trainable.safetensors"  # trained weights outside the LM adapter

Kind = Literal["training", "peft", "openflamingo"]


@dataclass(frozen=True)
class TrainedCheckpoint:
    """What ``resolve_checkpoint`` found: its kind, the file or folder to load, the model it was trained as."""

    kind: Kind
    path: Path
    model_cfg: dict | None  # the trained model section (None: use the configured one)
    config: dict | None = None  # the whole resolved config of the training run, when known

    def describe(self) -> str:
        """One line for logs and result tables."""
        return {
            "training": "training checkpoint",
            "peft": "peft adapter",
            "openflamingo": "OpenFlamingo checkpoint.pt",
        }[self.kind] + f" {self.path}"


def _run_config(checkpoint: Path) -> dict | None:
    """The ``config.yaml`` of the run a checkpoint sits in (``<run>/checkpoints/<file>``), if any."""
    candidate = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name == "checkpoints" and candidate.is_file():
        return yaml.safe_load(candidate.read_text())
    return None


def _from_run_dir(directory: Path) -> Path:
    from lavis.runners.checkpoint import BEST_NAME, CHECKPOINT_DIR, list_step_checkpoints

    best = directory / CHECKPOINT_DIR / BEST_NAME
    if best.is_file():
        return best
    steps = list_step_checkpoints(directory)
    if not steps:
        raise CheckpointError(
            f"{directory}: a run directory without checkpoints (no {CHECKPOINT_DIR}/best.pt or step_*.pt)"
        )
    return steps[-1][1]


def _peft(directory: Path) -> TrainedCheckpoint:
    section = directory / MODEL_SECTION
    model_cfg = yaml.safe_load(section.read_text()) if section.is_file() else None
    try:
        json.loads((directory / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory / PEFT_CONFIG}: not valid JSON: {err}") from None
    return TrainedCheckpoint("peft", directory, model_cfg)


def _peek(path: Path) -> dict:
    """The checkpoint's dict, memory-mapped where possible: it is only classified here, and loaded later."""
    from lavis.runners.checkpoint import load_checkpoint

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip file, or refused: the full loader gives the precise message
        return load_checkpoint(path)
    if not isinstance(state, dict):
        return load_checkpoint(path)
    return state


def _training(path: Path, state: dict) -> TrainedCheckpoint:
    config = state.get("config") or _run_config(path)
    if not config or not config.get("model"):
        raise CheckpointError(
            f"{path}: a training checkpoint that does not say which model it was trained as (no 'config' "
            f"in it and no config.yaml in its run directory); evaluate it with the training config "
            f"(--cfg-path) instead"
        )
    return TrainedCheckpoint("training", path, dict(config["model"]), dict(config))


def resolve_checkpoint(path: str | Path) -> TrainedCheckpoint:
    """Classify ``path`` (see the module docstring); CheckpointError saying what it is not."""
    from lavis.runners.checkpoint import load_checkpoint
    from lavis.runners.sharded_checkpoint import TRAIN_STATE, is_sharded_checkpoint

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if is_sharded_checkpoint(path):
        return _training(path, load_checkpoint(path / TRAIN_STATE))
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _peft(path)
        if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
            path = _from_run_dir(path)
        else:
            raise CheckpointError(
                f"{path}: a directory that is neither a run directory (checkpoints/) nor a peft adapter ({PEFT_CONFIG})"
            )
    state = _peek(path)
    if isinstance(state.get("model"), dict):
        return _training(path, state)
    flat = state.get("model_state_dict", state)
    if isinstance(flat, dict) and flat and all(isinstance(v, torch.Tensor) for v in flat.values()):
        return TrainedCheckpoint("openflamingo", path, None)
    raise CheckpointError(
        f"{path}: neither a training checkpoint of this framework (no 'model' entry) nor an "
        f"OpenFlamingo checkpoint.pt (a dict of tensors)"
    )


def model_section_for(trained: TrainedCheckpoint, configured: dict) -> dict:
    """The model section to build: ``configured`` with what ``trained`` says it was trained as.

    Training checkpoints and our exported adapters fix the adapters and the trainable parts (their weights
    are named after them); a bare peft adapter brings its LM adapter; an OpenFlamingo checkpoint.pt
    becomes ``pretrained_checkpoint_path``. Everything else (paths, dtype, quantisation) stays as
    configured, so the same evaluation config serves every checkpoint.
    """
    section = dict(configured)
    if trained.model_cfg is not None:
        for key in ("adapters", "trainable"):
            if key in trained.model_cfg:
                section[key] = trained.model_cfg[key]
    elif trained.kind == "peft":
        section["adapters"] = adapters_of_peft_dir(trained.path)
    elif trained.kind == "openflamingo":
        section["pretrained_checkpoint_path"] = str(trained.path)
    return section


def adapters_of_peft_dir(directory: Path) -> dict:
    """Our ``adapters`` section for a peft LoRA adapter folder (other peft types come with our export)."""
    peft_cfg = json.loads((Path(directory) / PEFT_CONFIG).read_text())
    if peft_cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{directory}: a {peft_cfg.get('peft_type')} adapter without {MODEL_SECTION}; only LoRA adapters can "
            f"be rebuilt from adapter_config.json alone (export with python -m lavis.export to keep the config)"
        )
    targets = peft_cfg.get("target_modules") or []
    return {
        "method": "lora",
        "r": int(peft_cfg["r"]),
        "alpha": int(peft_cfg["lora_alpha"]),
        "dropout": 0.0,
        "target_modules": sorted(targets) if not isinstance(targets, str) else [targets],
        "apply_to": ["lang_encoder"],
    }


def load_trained_weights(model: torch.nn.Module, trained: TrainedCheckpoint | str | Path) -> None:
    """Load the weights of ``trained`` (or of the checkpoint at that path) into a model built from
    :func:`model_section_for`."""
    if not isinstance(trained, TrainedCheckpoint):
        trained = resolve_checkpoint(trained)
    if trained.kind == "training":
        from lavis.runners.checkpoint import load_trainable_state_dict
        from lavis.runners.sharded_checkpoint import read_weights

        weights, _ = read_weights(trained.path)
        load_trainable_state_dict(model, weights, str(trained.path))
    elif trained.kind == "peft":
        _load_peft_dir(model, trained.path)
    # openflamingo: the builder already loaded it as pretrained_checkpoint_path


def _load_peft_dir(model: torch.nn.Module, directory: Path) -> None:
    import safetensors.torch
    from peft import set_peft_model_state_dict

    from lavis.models.adapters import peft_models

    wrapper = peft_models(model).get("lang_encoder")
    if wrapper is None:
        raise CheckpointError(f"{directory}: a peft adapter, but the model has no LM adapter to load it into")
    weights = safetensors.torch.load_file(str(directory / PEFT_WEIGHTS))
    result = set_peft_model_state_dict(wrapper, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{directory}: adapter weights that fit no module of the model: {unexpected[:5]}")
    extra = directory / FLAMINGO_TRAINABLE
    if extra.is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in safetensors.torch.load_file(str(extra)).items():
                if name not in params or params[name].shape != value.shape:
                    raise CheckpointError(f"{extra}: {name} does not fit the model")
                params[name].copy_(value)


def checkpoint_fingerprint(checkpoint: TrainedCheckpoint | str | Path) -> str:
    """sha256 of the checkpoint's bytes: the file's, or every file of a folder (peft, sharded) in name order."""
    import hashlib

    path = checkpoint.path if isinstance(checkpoint, TrainedCheckpoint) else Path(checkpoint)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_label(cfg, checkpoint: TrainedCheckpoint | str | Path | None) -> str:
    """How results tables name the evaluated model: the checkpoint's path, or ``arch/model_type (pretrained)``."""
    if checkpoint is None:
        return f"{cfg.model.arch}/{cfg.model.model_type} (pretrained)"
    return str(checkpoint.path if isinstance(checkpoint, TrainedCheckpoint) else checkpoint)


def describe_structure(section: dict) -> str:
    """The adapters and trainable parts of a model section as one readable line."""
    adapters = section.get("adapters") or {}
    method = adapters.get("method")
    if method:
        knobs = ", ".join(f"{k}={adapters[k]}" for k in ("r", "alpha", "dropout") if k in adapters)
        parts = ", ".join(adapters.get("apply_to") or ["lang_encoder"])
        targets = ", ".join(adapters.get("target_modules") or [])
        text = f"adapter {method} ({knobs}) on {parts} [{targets}]"
    else:
        text = "no adapter"
    trains = [k for k, v in (section.get("trainable") or {}).items() if v]
    return text + "; trains " + (", ".join(trains) if trains else "nothing else")

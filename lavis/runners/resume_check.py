"""Resuming checks that the run is the one the checkpoint was taken from.

A checkpoint's position (``global_step``, data epoch, micro-batch) only means
something under the config that produced it: another batch size, accumulation,
seed, split list, dataset or schedule length replays a different data order or lr
curve from the middle, silently. The keys that fix them must be unchanged; others
(e.g. ``max_steps``, ``log_freq``, ``valid_splits``) may change between the parts.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from lavis.common.errors import CheckpointError

# run.* keys that fix the data order and the lr schedule (beside the runner's PLAN_KEYS).
ORDER_KEYS = ("batch_size_train", "accum_grad_iters", "group_by_length", "train_max_shots", "seed", "train_splits")
ORDER_KEYS += ("lr_sched",)
# What a key added after a checkpoint was written meant then (its behaviour before the key existed).
BEFORE_THE_KEY = {"group_by_length": False, "train_max_shots": 0}
_ABSENT = "<absent>"


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _as_dict(cfg) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def resume_differences(old_cfg: dict, new_cfg, plan_keys: tuple[str, ...]) -> list[str]:
    """``"key: old -> new"`` for each position-defining key that differs between the two configs."""
    old, new = _as_dict(old_cfg), _as_dict(new_cfg)
    old_run, new_run = old.get("run") or {}, new.get("run") or {}
    diffs = []
    for key in (*ORDER_KEYS, *plan_keys):
        absent = BEFORE_THE_KEY.get(key, _ABSENT)
        a, b = old_run.get(key, absent), new_run.get(key, absent)
        if a != b:
            diffs.append(f"run.{key}: {a!r} -> {b!r}")
    # Every dataset section: a changed path, split or processor changes the samples behind the position.
    old_data = _flatten(old.get("datasets") or {}, "datasets")
    new_data = _flatten(new.get("datasets") or {}, "datasets")
    for key in sorted(set(old_data) | set(new_data)):
        a, b = old_data.get(key, _ABSENT), new_data.get(key, _ABSENT)
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def check_resume_config(old_cfg: dict, new_cfg, plan_keys: tuple[str, ...], path) -> None:
    """Raise a CheckpointError naming every differing key, unless the checkpoint holds no config."""
    if not old_cfg:
        return  # written from a plain-dict config: nothing to compare against
    diffs = resume_differences(old_cfg, new_cfg, plan_keys)
    if diffs:
        raise CheckpointError(
            f"{path}: the config differs from the one this checkpoint was taken with in keys that fix the data "
            f"order or the lr schedule: {'; '.join(diffs)}; resume with the original values or start a new run"
        )

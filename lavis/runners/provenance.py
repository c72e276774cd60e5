"""What a run directory tells about how it was made: run_info.json, the config history, the summary.

``run_info.json`` lists every invocation that wrote into the run (the first, then each resume): argv,
cwd, git commit and dirty flag of the code, Python / torch / transformers / peft / open_clip versions,
device names, world size, host, start and end time, status. Each invocation's resolved config is kept
as ``configs/invocation_<n>.yaml`` and ``config.yaml`` is the latest, so a resume with other options
leaves no stale config behind. The runner calls :func:`start_invocation` once it has its run directory
and :func:`finish_invocation` at the end; only rank 0 writes.

Also here: one results file per evaluation (:func:`keep_results`) and the end-of-run summary.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lavis.common.fileio import atomic_write_json, atomic_write_text
from lavis.common.logging import get_logger

RUN_INFO = "run_info.json"
CONFIG_HISTORY = "configs"
_PACKAGES = ("torch", "transformers", "peft", "open_clip_torch", "tokenizers", "omegaconf")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_state(directory: Path) -> dict | None:
    """``{"commit", "dirty"}`` of the git tree holding ``directory``; None outside one (or without git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    """Python and the versions of the packages a result depends on (None when not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_names(device: torch.device) -> list[str]:
    """The accelerator's name (every visible GPU), or the CPU's."""
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return [line.split(":", 1)[1].strip()]
    except OSError:
        pass
    return [platform.processor() or platform.machine() or "cpu"]


def invocation(dist_info) -> dict:
    """This process's invocation record (see the module docstring)."""
    code = Path(__file__).resolve().parent.parent.parent
    return {
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "git": git_state(code) or git_state(Path.cwd()),
        "versions": package_versions(),
        "devices": device_names(dist_info.device),
        "device": str(dist_info.device),
        "world_size": dist_info.world_size,
        "host": socket.gethostname(),
        "start_time": _now(),
        "end_time": None,
        "status": "running",
    }


def _read(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            get_logger().warning("%s is not valid JSON; starting a new one", path)
    return {"invocations": []}


def start_invocation(paths, cfg, dist_info, model=None) -> None:
    """Record this invocation in run_info.json, its config in the history (and as config.yaml on resume),
    and the trainable-parameter summary in log.txt. Rank 0 only."""
    if not dist_info.is_main:
        return
    run_dir = paths.run_dir
    record = _read(run_dir)
    entry = invocation(dist_info)
    number = len(record["invocations"]) + 1
    text = (
        OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else OmegaConf.to_yaml(OmegaConf.create(cfg))
    )
    history = run_dir / CONFIG_HISTORY / f"invocation_{number}.yaml"
    atomic_write_text(history, text)
    entry["config"] = str(history.relative_to(run_dir))
    entry["resumed_from"] = str(paths.resume_from) if paths.resume_from else None
    if number > 1:
        atomic_write_text(run_dir / "config.yaml", text)  # the config of the latest invocation
    record["invocations"].append(entry)
    record.update({k: entry[k] for k in ("argv", "cwd", "git", "versions", "devices", "world_size", "host")})
    record.setdefault("start_time", entry["start_time"])
    record["end_time"] = None
    atomic_write_json(run_dir / RUN_INFO, record, indent=2)
    model_cfg = cfg.get("model")  # a DictConfig or a plain dict; toy runs have no model section
    if model_cfg is not None and "arch" in model_cfg:
        from lavis.models.trained import describe_structure

        plain = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
        get_logger().info("model: %s/%s, %s", plain.get("arch"), plain.get("model_type"), describe_structure(plain))
    if model is not None:
        log_trainable_parameters(model)


def finish_invocation(paths, dist_info, status: str, summary: dict | None = None) -> None:
    """Close this invocation's record: end time, status and the summary. Rank 0 only."""
    if not dist_info.is_main or not (paths.run_dir / RUN_INFO).is_file():
        return
    record = _read(paths.run_dir)
    if record["invocations"]:
        record["invocations"][-1].update(end_time=_now(), status=status)
    record.update(end_time=_now(), status=status)
    if summary is not None:
        record["summary"] = summary
    atomic_write_json(paths.run_dir / RUN_INFO, record, indent=2)


def log_trainable_parameters(model) -> None:
    """The adapter line and the trainable-parameter counts per part, into the log (and so log.txt)."""
    from lavis.models.adapters import trainable_parameter_summary, unwrap_model

    net = unwrap_model(model)
    summary = trainable_parameter_summary(net)
    lines = [f"  {part}: {n['trainable']:,} / {n['total']:,}" for part, n in summary.items()]
    get_logger().info("trainable parameters:\n%s", "\n".join(lines))


def keep_results(results_dir: Path, since: float, split: str, epoch: int | None, step: int) -> list[Path]:
    """Copy the results files an evaluation just wrote (mtime >= ``since``) to a name with its epoch and step.

    The task writes ``<split>_<kind>_results.json``, which each evaluation replaces; the copy
    ``<split>_epoch<E>_step<S>_<kind>_results.json`` keeps every evaluation's. Returns the copies.
    """
    kept = []
    tag = f"{split}_epoch{epoch}_step{step}" if epoch is not None else f"{split}_step{step}"
    for path in sorted(Path(results_dir).glob(f"{split}_*results.json")):
        rest = path.name[len(split) :]
        if rest.startswith(("_epoch", "_step")) or path.stat().st_mtime < since:
            continue
        target = path.with_name(tag + rest)
        atomic_write_text(target, path.read_text(encoding="utf-8"))
        kept.append(target)
    return kept


def end_of_run_summary(runner, status: str, started: float) -> dict:
    """The summary of a training run (returned, logged and stored in run_info.json)."""
    from lavis.runners import checkpoint as ckpt

    run_dir = runner.paths.run_dir
    steps = ckpt.list_step_checkpoints(run_dir)
    best_path = runner.paths.checkpoints / ckpt.BEST_NAME
    best = dict(runner.best)
    metric = runner.run_cfg.best_metric
    if metric == "agg_metrics" and runner.best_dataset is not None and runner.best_split is not None:
        from lavis.common.logging import metric_name

        metric = metric_name(runner.run_cfg, runner.datasets[runner.best_dataset][runner.best_split])
    return {
        "status": status,
        "steps": runner.global_step,
        "total_steps": runner.total_steps,
        "best": {
            **best,
            "metric_name": metric,
            "split": runner.best_split,
            "checkpoint": str(best_path) if best_path.exists() else None,
        },
        "wall_time_s": round(time.time() - started, 1),
        "paths": {
            "run_dir": str(run_dir),
            "latest_checkpoint": str(steps[-1][1]) if steps else None,
            "metrics": str(runner.paths.metrics),
            "log": str(runner.paths.log),
            "results": str(runner.paths.results),
            "config": str(run_dir / "config.yaml"),
        },
    }


def format_summary(summary: dict) -> str:
    """The summary as the few lines printed at the end of a run."""
    best = summary["best"]
    best_text = (
        f"{best['metric_name']} {best['metric']:.4g} on {best['split']} at step {best['step']}"
        if best.get("metric") is not None
        else "none (no validation)"
    )
    lines = [
        f"run {summary['status']}: {summary['steps']} step(s) in {summary['wall_time_s']:.0f} s",
        f"  best: {best_text}" + (f" -> {best['checkpoint']}" if best.get("checkpoint") else ""),
    ]
    lines += [f"  {name}: {path}" for name, path in summary["paths"].items() if path]
    return "\n".join(lines)

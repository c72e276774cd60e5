"""The start of every run, training (``RunnerBase``) or few-shot evaluation: one set-up.

``start_run`` brings up the process group and device, resolves the precision, seeds
every rank (``run.seed + rank``), runs the caller's start-up checks (``before_run_dir``:
training places the model with its strategy there, so a model the strategy refuses leaves
no run directory behind) and makes the run directory; ``open_logs`` then opens the log
file and the metrics log in it. What happens between the two differs (training reads the
checkpoint it resumes before anything is logged; evaluation loads the checkpoint it
scores), so they are two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lavis.common import dist
from lavis.common.logging import MetricsLog, setup_logging
from lavis.runners.checkpoint import set_seed
from lavis.runners.precision import Precision, resolve_precision
from lavis.runners.run_dir import RunPaths


@dataclass(frozen=True)
class RunStart:
    """Where a run executes and writes."""

    dist_info: dist.DistInfo
    precision: Precision
    paths: RunPaths


def start_run(
    run,
    make_run_dir: Callable[[], RunPaths],
    before_run_dir: Callable[[dist.DistInfo, Precision], None] | None = None,
) -> RunStart:
    """Process group, device, precision and seed from the typed ``run`` section, then ``before_run_dir`` (a
    ConfigError there leaves nothing on disk), then ``make_run_dir()``."""
    dist_info = dist.init_distributed(run.device, run.dist_timeout_s)
    precision = resolve_precision(run.amp, dist_info.device)
    set_seed(run.seed + dist_info.rank)
    if before_run_dir is not None:
        before_run_dir(dist_info, precision)
    return RunStart(dist_info, precision, make_run_dir())


def open_logs(start: RunStart, **metrics_options) -> MetricsLog:
    """The run's log file (written by the main process) and its metrics log (``MetricsLog`` options)."""
    setup_logging(start.dist_info.rank, start.paths.log if start.dist_info.is_main else None)
    return MetricsLog(start.paths.metrics, enabled=start.dist_info.is_main, **metrics_options)

"""Runners, optimisation and checkpoints; importing the package registers the runners and lr schedules."""

from lavis.runners import optim, runner, runner_iter  # noqa: F401  (registration side effects)
from lavis.runners.run_config import RunConfig
from lavis.runners.runner import RunnerBase
from lavis.runners.runner_iter import RunnerIter

__all__ = ["RunConfig", "RunnerBase", "RunnerIter"]

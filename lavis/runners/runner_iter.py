"""The iteration-based runner ``runner_iter`` (LAVIS's name), a planning variant of ``runner_base``."""

from __future__ import annotations

from lavis.common.errors import ConfigError
from lavis.common.registry import registry
from lavis.runners.data import TrainStream
from lavis.runners.runner import RunnerBase


@registry.register_runner("runner_iter")
class RunnerIter(RunnerBase):
    """Iteration-based runner: ``max_iters`` steps in inner epochs of ``iters_per_inner_epoch`` steps.

    The data wraps around its epochs (reshuffled each time) independently of the inner epochs.
    """

    PLAN_KEYS = ("max_iters", "iters_per_inner_epoch")

    def plan(self, stream: TrainStream) -> tuple[int, int]:
        run = self.run_cfg
        if not run.max_iters or run.max_iters <= 0:
            raise ConfigError("run.max_iters: runner_iter needs a positive number of optimizer steps")
        per_period = run.iters_per_inner_epoch or run.max_iters
        return int(per_period), int(run.max_iters)

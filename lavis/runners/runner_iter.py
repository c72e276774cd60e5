"""The iteration-based runner ``runner_iter`` (LAVIS's name), a planning variant of ``runner_base``."""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.runners.data import TrainStream
from lavis.runners.run_config import IterRunConfig
from lavis.runners.runner import RunnerBase


@registry.register_runner("runner_iter")
class RunnerIter(RunnerBase):
    """Iteration-based runner: ``max_iters`` steps in inner epochs of ``iters_per_inner_epoch`` steps.

    The data wraps around its epochs (reshuffled each time) independently of the inner epochs.
    """

    #: max_iters is required (checked with the other run keys at load time).
    Config = IterRunConfig
    PLAN_KEYS = ("max_iters", "iters_per_inner_epoch")

    def plan(self, stream: TrainStream) -> tuple[int, int]:
        run = self.run_cfg
        per_period = run.iters_per_inner_epoch or run.max_iters
        return int(per_period), int(run.max_iters)

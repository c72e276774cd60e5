"""The objective of one optimizer step: how its micro-batch losses are weighted (``run.loss_reduction``).

``token`` (default): the step's loss is the sum of the per-token losses over every target token of
the global batch (all ranks, all micro-batches) divided by their count, as if the global batch were
one batch in one process; so 1 process, N processes and accumulation train the same objective.
``sequence``: each micro-batch's own token mean, averaged equally over micro-batches and ranks (the
behaviour before token weighting; a rank or micro-batch with few target tokens weighs as much as one
with many).

A task's ``train_step`` returns the summed loss of a micro-batch and its ``loss_count`` the number of
targets; the step's weights come from the counts alone, which live on the host (counted from the CPU
labels), so the one all-reduce of the count per step never waits for the device.
"""

from __future__ import annotations

from lavis.common import dist

REDUCTIONS = ("token", "sequence")


def micro_batch_weights(reduction: str, counts: list[int], world_size: int) -> list[float]:
    """Weight ``w_i`` of each micro-batch's summed loss: the step's objective is ``sum over ranks, i of w_i * loss_i``.

    ``counts`` are this rank's target counts of the step's micro-batches. Under ``token`` every rank
    joins one all-reduce of the count (a CPU collective). An all-masked step (count 0) weighs 0.
    """
    if reduction == "token":
        total = dist.sum_over_ranks(sum(counts))
        return [1.0 / max(total, 1)] * len(counts)
    if reduction == "sequence":
        return [1.0 / (max(n, 1) * len(counts) * world_size) for n in counts]
    raise ValueError(f"unknown loss reduction {reduction!r}; expected one of {REDUCTIONS}")

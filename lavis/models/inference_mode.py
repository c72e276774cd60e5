"""The gradient-free mode of a model's inference methods (generation, scoring)."""

from __future__ import annotations

import functools

import torch
from torch.distributed.fsdp import FSDPModule


def inference_method(fn):
    """Run ``fn(model, ...)`` under ``torch.inference_mode``, or ``torch.no_grad`` for an FSDP2-sharded model.

    Inference mode skips autograd's version counters and view tracking on every operation, which a small
    model's decoding step feels: the tiny OpenFlamingo evaluates 0-shot about 8% faster than under no_grad
    (benchmarks/fewshot_eval.py), as OpenFlamingo's own evaluation runs under inference mode. FSDP2's
    unshard swaps parameters in place under their version counters, which inference tensors lack, so a
    sharded model keeps no_grad. Tensors made here never enter autograd later: the media cache that keeps
    encodings across calls serves only calls without gradients.
    """

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode():
            return fn(model, *args, **kwargs)

    return wrapper

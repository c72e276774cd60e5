"""float32 master weights for the parameters that train inside a half-precision frozen model.

With ``frozen_dtype: float16`` (or bfloat16) the language model is stored in half precision, and so are
the parts of it that the policy lets train (embedding rows, ``modules_to_save`` copies). Those must be
float32: ``GradScaler`` refuses to unscale float16 gradients, and Adam updates below half precision's
resolution would be lost. The peft adapters are already float32 (peft's ``autocast_adapter_dtype``); the
perceiver and the cross-attention blocks are built in float32, and only what stays frozen of them is cast
to the frozen dtype (``cast_frozen_parameters``).

A module that owns an up-cast parameter computes in float32 and hands its output back in the dtype it
had before, so its neighbours (frozen half-precision layers) see the same dtypes with or without autocast.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _compute_in_float32(module: nn.Module, outer_dtype: torch.dtype) -> None:
    def inputs_to_float32(_module, args, kwargs):
        return tuple(_cast(a, torch.float32) for a in args), {k: _cast(v, torch.float32) for k, v in kwargs.items()}

    def output_to_outer_dtype(_module, _args, output):
        return _cast(output, outer_dtype)

    module.register_forward_pre_hook(inputs_to_float32, with_kwargs=True)
    module.register_forward_hook(output_to_outer_dtype)


def upcast_trainable_parameters(model: nn.Module) -> list[str]:
    """Make every half-precision parameter with ``requires_grad`` float32, in place; returns their names.

    Parameters keep their identity (tied weights stay tied, gradient hooks stay registered, an optimizer
    built afterwards sees float32 tensors). Call it after the freezing policy, before building the optimizer.
    """
    original: dict[int, torch.dtype] = {}
    names = []
    for name, param in model.named_parameters():  # a tied parameter is listed once
        if param.requires_grad and param.dtype in HALF_DTYPES:
            original[id(param)] = param.dtype
            param.data = param.data.float()
            names.append(name)
    for module in model.modules():
        owned = [original[id(p)] for p in module.parameters(recurse=False) if id(p) in original]
        if owned:
            _compute_in_float32(module, owned[0])
    if names:
        logger.info(
            "%d trainable parameter tensor(s) kept in float32 (master weights): %s%s",
            len(names),
            ", ".join(names[:5]),
            "..." if len(names) > 5 else "",
        )
    return names


def cast_frozen_parameters(module: nn.Module, dtype: torch.dtype) -> list[str]:
    """Store the floating-point parameters of ``module`` without ``requires_grad`` in ``dtype``, in place.

    Returns their names. Parameters keep their identity; the ones that train are left as they are (float32).
    Call it after the freezing policy: frozen weights then cost half the memory, as the frozen LM's do.
    """
    names = []
    for name, param in module.named_parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            names.append(name)
    return names

"""AdaLoRA's training hooks: rank re-allocation, its state in checkpoints, the orthogonality penalty.

peft runs these inside ``AdaLoraModel.forward`` and its training examples; our network calls the LM
directly (with its cross-attention hooks), so the model exposes them as training hooks instead
(``OpenFlamingo.optimizer_step_hook``, ``training_state``, ``training_loss_extras``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lavis.models.adapters import peft_models


def is_adalora(wrapper) -> bool:
    """Whether a peft wrapper (``peft_models``) holds an AdaLoRA model, whose ranks re-allocate in training."""
    from peft import AdaLoraModel

    return isinstance(wrapper.base_model, AdaLoraModel)


def update_adapter_budget(model: nn.Module, global_step: int) -> None:
    """AdaLoRA's rank re-allocation; call after backward and before zero_grad on each optimizer step.

    A no-op for the other methods, so the runner may call it unconditionally.
    """
    for wrapper in peft_models(model).values():
        if is_adalora(wrapper):
            wrapper.base_model.update_and_allocate(global_step)


_ALLOCATOR_STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def allocator_state(model: nn.Module) -> dict:
    """AdaLoRA's rank-allocator statistics and rank pattern per adapted part ({} for other methods).

    They are not parameters, so no state_dict holds them; a resumed run needs them to re-allocate
    ranks as the uninterrupted run would.
    """
    out = {}
    for part, wrapper in peft_models(model).items():
        allocator = getattr(wrapper.base_model, "rankallocator", None)
        if allocator is None:
            continue
        stats = {
            key: {n: t.detach().cpu().clone() for n, t in getattr(allocator, key).items()} for key in _ALLOCATOR_STATS
        }
        config = next(iter(wrapper.peft_config.values()))
        out[part] = {**stats, "rank_pattern": config.rank_pattern}
    return out


def load_allocator_state(model: nn.Module, state: dict) -> None:
    """Restore what :func:`allocator_state` saved (onto the device of the model's parameters)."""
    wrappers = peft_models(model)
    device = next(model.parameters()).device
    for part, saved in state.items():
        allocator = getattr(wrappers.get(part) and wrappers[part].base_model, "rankallocator", None)
        if allocator is None:
            raise ValueError(f"the checkpoint holds AdaLoRA allocator state for {part!r}, which has no AdaLoRA")
        for key in _ALLOCATOR_STATS:
            setattr(allocator, key, {n: t.to(device) for n, t in saved[key].items()})
        next(iter(wrappers[part].peft_config.values())).rank_pattern = saved["rank_pattern"]


def adapter_regularization_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """AdaLoRA's orthogonality penalty (weighted by orth_reg_weight) to add to the loss; None for other methods.

    peft adds it inside AdaLoraModel.forward, which we bypass (the LM is called directly, with its
    cross-attention hooks), so the task adds this term itself. It pushes P (lora_A) and Q (lora_B)
    of each SVD-style adapter towards orthonormal rows/columns: mean of ||P P^T - I||_F and ||Q^T Q - I||_F.
    """
    total = None
    for wrapper in peft_models(model).values():
        cfg = next(iter(wrapper.peft_config.values()))
        if getattr(cfg, "peft_type", None) != "ADALORA" or cfg.orth_reg_weight == 0:
            continue
        norms = []
        for name, param in wrapper.base_model.model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                # On the float32 weights themselves: under a half-precision autocast the Gram matrix would
                # lose the small deviations from the identity that the penalty is about.
                with torch.autocast(param.device.type, enabled=False):
                    weight = param.float()
                    gram = weight @ weight.T if ".lora_A." in name else weight.T @ weight
                    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                    norms.append(torch.linalg.matrix_norm(gram - eye))
        if norms:
            term = cfg.orth_reg_weight * torch.stack(norms).mean()
            total = term if total is None else total + term
    return total

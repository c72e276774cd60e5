"""Inference methods run under torch.inference_mode, except on an FSDP2-sharded model (no_grad there)."""

from __future__ import annotations

import torch
from torch import nn

from lavis.models import build_model, inference_mode
from lavis.models.inference_mode import inference_method
from tests.test_flamingo_network import PROMPTS, prompts_batch, tiny_cfg


@inference_method
def modes(model):
    return torch.is_inference_mode_enabled(), torch.is_grad_enabled()


class Sharded(nn.Module):
    """Stands for an FSDP2 module in the type check (fully_shard needs a process group)."""


def test_plain_model_runs_in_inference_mode():
    assert modes(nn.Linear(2, 2)) == (True, False)


def test_sharded_model_runs_in_no_grad(monkeypatch):
    monkeypatch.setattr(inference_mode, "FSDPModule", Sharded)
    assert modes(Sharded()) == (False, False)
    assert modes(nn.Linear(2, 2)) == (True, False)


def test_generated_tokens_of_the_tiny_openflamingo_are_inference_tensors():
    model = build_model(tiny_cfg()).eval()
    tokens = model.generate(*prompts_batch(model, PROMPTS), num_beams=2, max_new_tokens=2)
    assert torch.is_inference(tokens)
    # The model stays trainable afterwards: nothing the generation kept enters autograd.
    model.train()
    vision_x, lang_x, mask = prompts_batch(model, PROMPTS)
    loss = model(vision_x, lang_x, mask, labels=lang_x).loss
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())

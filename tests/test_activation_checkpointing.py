"""model.gradient_checkpointing on the tiny OpenFlamingo, in one process (the ddp path; fsdp: test_runner_fsdp.py).

With checkpointing, the LM decoder layers, the cross-attention blocks and the perceiver run their forward
twice (the second time in backward, recomputing what was not stored) and the gradients equal the unchecked run's.
"""

from __future__ import annotations

import torch
from test_training_hooks import CaptionLikeDataset, CaptionLikeTask, tiny_model
from toy_components import make_cfg

from lavis.models.flamingo.flamingo import decoder_layers

FULL = {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": False, "lang_encoder": True}
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def gradients(checkpointing: bool, adapters=None, trainable=None):
    torch.manual_seed(0)
    model = tiny_model(adapters=adapters or {"method": None}, trainable=trainable or FULL)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    calls = {"layer": 0, "xattn": 0, "perceiver": 0}
    # transformers checkpoints the decoder layer's class-level forward: its MLP is watched instead.
    watched = {
        "layer": decoder_layers(model.lang_encoder)[0].mlp,
        "xattn": model.gated_cross_attn_layers["0"],
        "perceiver": model.perceiver,
    }
    for key, module in watched.items():
        # Counted in forward itself: the recomputation in backward does not run the module's forward hooks.
        def counting(*args, _key=key, _forward=module.forward, **kwargs):
            calls[_key] += 1
            return _forward(*args, **kwargs)

        module.forward = counting
    task = CaptionLikeTask(make_cfg("unused"))
    dataset = CaptionLikeDataset(3, model.image_size, seed=4)
    batch = task.collator(model, "train")([dataset[i] for i in range(3)])
    task.train_step(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, calls


def test_checkpointing_recomputes_layers_cross_attention_and_perceiver_with_equal_gradients():
    plain, plain_calls = gradients(False)
    checked, checked_calls = gradients(True)
    assert plain_calls == {"layer": 1, "xattn": 1, "perceiver": 1}
    assert checked_calls == {"layer": 2, "xattn": 2, "perceiver": 2}  # recomputed in backward
    assert sorted(plain) == sorted(checked) and len(plain) > 30
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_with_lora_and_a_frozen_lm_gives_equal_gradients():
    parts = {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": False, "lm_embeddings": False}
    plain, _ = gradients(False, LORA, parts)
    checked, calls = gradients(True, LORA, parts)
    assert calls["layer"] == 2 and any("lora_B" in n for n in plain)
    assert sorted(plain) == sorted(checked)
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)

"""The model's training hooks through the runner, on the tiny OpenFlamingo (CPU, seconds).

AdaLoRA: the runner re-allocates the rank budget on every optimizer step, and the orthogonality
penalty is part of the training loss. Half precision: with a bfloat16 frozen model, what trains is
float32 (master weights) and one bf16-autocast step of the runner trains it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_components import make_cfg

from lavis.common.config import read_yaml
from lavis.common.registry import registry
from lavis.datasets.samples import SplitDataset
from lavis.models import adalora, build_model
from lavis.models import adapters as A
from lavis.tasks.base import BaseTask

torch.set_num_threads(1)

TINY_YAML = Path(__file__).resolve().parents[1] / "lavis/configs/models/openflamingo/tiny.yaml"
WORDS = "a red green blue circle square triangle on the left right top bottom".split()
FROZEN_PARTS = {"perceiver": False, "gated_cross_attn": False, "new_token_embeddings": False, "lm_embeddings": False}


def tiny_model(**overrides):
    cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(read_yaml(TINY_YAML).model).items()}
    cfg.update(overrides)
    return build_model(cfg)


class CaptionLikeDataset(SplitDataset):
    """``n`` random images with a short random caption each."""

    sample_id_key = "sample_id"

    def __init__(self, n: int, image_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, image_size, image_size, generator=g)
        picks = torch.randint(len(WORDS), (n, 5), generator=g)
        self.texts = [" ".join(WORDS[int(i)] for i in row) for row in picks]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text": self.texts[i], "sample_id": i}

    def sample_ids(self) -> list[int]:
        return list(range(len(self)))


class CaptionLikeTask(BaseTask):
    """BaseTask's train_step on ``<image>caption<|endofchunk|>`` batches (loss on every real token)."""

    sample_id_key = "sample_id"

    def collator(self, model, role):
        tokenizer = model.tokenizer
        tokenizer.padding_side = "right"

        def collate(items):
            batch = tokenizer(
                [f"<image>{it['text']}<|endofchunk|>" for it in items], return_tensors="pt", padding="longest"
            )
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            return {
                "vision_x": torch.stack([it["image"] for it in items])[:, None, None],
                "lang_x": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "labels": labels,
                "sample_id": [it["sample_id"] for it in items],
            }

        return collate


def train(tmp_path, model, n_train: int, **run):
    cfg = make_cfg(tmp_path, batch_size_train=2, max_epoch=1, warmup_steps=0, init_lr=1e-3, **run)
    task = CaptionLikeTask(cfg)
    datasets = {"lm": {"train": CaptionLikeDataset(n_train, model.image_size)}}
    runner = registry.get("runner", cfg.run.runner)(cfg, task, model, datasets)
    return runner, runner.train()


ADALORA = {
    "method": "adalora",
    "r": 4,
    "target_r": 2,
    "alpha": 8,
    "dropout": 0.0,
    "total_step": 4,
    "tinit": 0,
    "tfinal": 1,
    "deltaT": 1,
    "target_modules": ["q_proj", "v_proj"],
}


def test_runner_reallocates_the_adalora_budget_every_optimizer_step(tmp_path, monkeypatch):
    model = tiny_model(adapters=ADALORA, trainable=FROZEN_PARTS)
    peft_cfg = A.peft_models(model)["lang_encoder"].peft_config["default"]
    assert peft_cfg.rank_pattern is None
    lora_e = {n: p for n, p in model.named_parameters() if ".lora_E." in n}
    assert len(lora_e) == 4  # q_proj and v_proj of both layers, r=4 each: an initial budget of 16 ranks

    calls = []
    real_update = adalora.update_adapter_budget

    def spy(net, global_step):
        # Called between backward and zero_grad: the gradients AdaLoRA scores ranks with are there.
        calls.append((global_step, all(p.grad is not None for p in lora_e.values())))
        real_update(net, global_step)

    monkeypatch.setattr(adalora, "update_adapter_budget", spy)
    runner, summary = train(tmp_path, model, n_train=8)  # 4 optimizer steps = total_step

    assert summary["status"] == "finished" and runner.global_step == 4
    assert calls == [(0, True), (1, True), (2, True), (3, True)]
    # Step 3 = total_step - tfinal fixed the final pattern: the target budget of 2 ranks per module on
    # average (8 of 16), distributed by importance, and the pruned singular values are zero.
    pattern = peft_cfg.rank_pattern
    assert pattern is not None and len(pattern) == 4
    kept = sum(sum(bool(k) for k in keep) for keep in pattern.values())
    assert 0 < kept <= 8
    for name, param in lora_e.items():
        keep = next(torch.tensor(v) for k, v in pattern.items() if name.endswith(k))
        assert torch.all(param.detach().flatten()[~keep] == 0), name


def test_adalora_penalty_is_part_of_the_training_loss_only():
    model = tiny_model(adapters=ADALORA, trainable=FROZEN_PARTS)
    with torch.no_grad():  # move P and Q away from orthonormal so that the penalty is clearly nonzero
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.mul_(3.0)
    task = CaptionLikeTask(make_cfg("unused"))
    batch = task.collator(model, "train")([CaptionLikeDataset(2, model.image_size)[i] for i in range(2)])
    penalty = model.training_loss_extras()
    assert penalty is not None and penalty.item() > 0
    with torch.no_grad():
        model.train()
        train_loss = task.train_step(model, batch)
        model.eval()
        eval_loss = task.train_step(model, batch)
    # train_step sums over the batch's targets: the penalty weighs by their count (once per step after the
    # runner divides by the step's count).
    count = task.loss_count(batch)
    assert count > 0
    torch.testing.assert_close(train_loss, eval_loss + penalty * count, rtol=1e-5, atol=1e-5)

    lora = tiny_model(adapters={"method": "lora", "r": 4}, trainable=FROZEN_PARTS)
    assert lora.training_loss_extras() is None


def test_bf16_frozen_model_trains_float32_master_weights_under_bf16_autocast(tmp_path):
    model = tiny_model(
        frozen_dtype="bfloat16",
        adapters={"method": "lora", "r": 4, "dropout": 0.0},
        trainable={"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": True, "lm_embeddings": False},
    )
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert {params[n].dtype for n in trainable} == {torch.float32}
    assert any(n.startswith("perceiver.") for n in trainable) and any(".lora_A." in n for n in trainable)
    embedding = model.lang_encoder.get_input_embeddings()
    assert embedding.weight.requires_grad and embedding.weight.dtype == torch.float32
    # The tiny LM ties its output head to the embedding: it stays tied (one float32 tensor).
    assert model.lang_encoder.get_output_embeddings().weight is embedding.weight
    frozen_lm = model.lang_encoder.get_decoder().layers[0].self_attn.q_proj.base_layer.weight
    assert frozen_lm.dtype == torch.bfloat16 and model.vision_encoder.conv1.weight.dtype == torch.bfloat16

    # Without autocast the half-precision layers still get the dtype they expect.
    task = CaptionLikeTask(make_cfg("unused"))
    batch = task.collator(model, "train")([CaptionLikeDataset(2, model.image_size)[i] for i in range(2)])
    loss = task.train_step(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: params[n].grad for n in trainable if params[n].grad is not None}
    assert grads and {g.dtype for g in grads.values()} == {torch.float32}  # what GradScaler can unscale
    model.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in params.items()}
    new_rows = [model.tokenizer.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>")]
    runner, summary = train(tmp_path, model, n_train=2, amp="bf16")
    assert summary["status"] == "finished" and runner.global_step == 1
    after = dict(model.named_parameters())
    assert not torch.equal(after["perceiver.latents"], before["perceiver.latents"])
    lora_a = next(n for n in trainable if ".lora_A." in n)
    assert not torch.equal(after[lora_a], before[lora_a])
    assert torch.equal(after[frozen_lm_name(params, frozen_lm)], before[frozen_lm_name(params, frozen_lm)])
    emb_name = frozen_lm_name(params, embedding.weight)
    changed_rows = (after[emb_name] != before[emb_name]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows and set(changed_rows) <= set(new_rows)


def test_bf16_frozen_flamingo_parts_are_stored_in_bf16_and_trainable_ones_in_float32():
    # Perceiver frozen, cross-attention frozen but adapted by LoRA: the frozen weights are bfloat16 like the
    # LM's; the adapters train in float32. A forward and backward pass runs without autocast.
    model = tiny_model(
        frozen_dtype="bfloat16",
        adapters={"method": "lora", "r": 4, "dropout": 0.0, "apply_to": ["gated_cross_attn_layers"]},
        trainable=FROZEN_PARTS,
    )
    params = dict(model.named_parameters())
    frozen_parts = [
        n for n in params if n.startswith(("perceiver.", "gated_cross_attn_layers.")) and not params[n].requires_grad
    ]
    assert any(n.startswith("perceiver.") for n in frozen_parts) and any("base_layer" in n for n in frozen_parts)
    assert {params[n].dtype for n in frozen_parts} == {torch.bfloat16}
    assert model.perceiver.latents.dtype == torch.bfloat16
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {params[n].dtype for n in trainable} == {torch.float32}
    task = CaptionLikeTask(make_cfg("unused"))
    batch = task.collator(model, "train")([CaptionLikeDataset(2, model.image_size)[i] for i in range(2)])
    loss = task.train_step(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(params[n].grad is not None and params[n].grad.dtype == torch.float32 for n in trainable)

    # Trainable, the same parts stay float32 (never rounded to bfloat16 and back).
    fp32 = tiny_model(trainable=FROZEN_PARTS | {"perceiver": True, "gated_cross_attn": True})
    half = tiny_model(frozen_dtype="bfloat16", trainable=FROZEN_PARTS | {"perceiver": True, "gated_cross_attn": True})
    for part in ("perceiver", "gated_cross_attn_layers"):
        for (name, p), q in zip(getattr(half, part).named_parameters(), getattr(fp32, part).parameters()):
            assert p.dtype == torch.float32 and torch.equal(p, q), name


def frozen_lm_name(params: dict, tensor: torch.Tensor) -> str:
    return next(n for n, p in params.items() if p is tensor)


@pytest.mark.parametrize("method", ["lora", None])
def test_float32_model_is_left_as_it_is(method):
    model = tiny_model(adapters={"method": method}, trainable=FROZEN_PARTS | {"perceiver": True})
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.lang_encoder.get_input_embeddings()._forward_hooks


def test_adalora_run_resumed_midway_equals_the_uninterrupted_run(tmp_path):
    # AdaLoRA ranks by importance averaged over steps: the allocator's statistics are training state
    # that the checkpoint must carry, or the resumed run prunes other ranks.
    adalora_cfg = {**ADALORA, "total_step": 10, "tfinal": 1}
    torch.manual_seed(0)
    whole = tiny_model(adapters=adalora_cfg, trainable=FROZEN_PARTS)
    train(tmp_path / "whole", whole, n_train=20)

    torch.manual_seed(0)
    first = tiny_model(adapters=adalora_cfg, trainable=FROZEN_PARTS)
    train(tmp_path / "cut", first, n_train=20, max_steps=6)
    saved = adalora.allocator_state(first)["lang_encoder"]
    assert len(saved["exp_avg_ipt"]) > 0  # mid-run, the allocator holds statistics
    (checkpoint,) = sorted((tmp_path / "cut" / "toy" / "checkpoints").glob("step_*.pt"))[-1:]
    in_file = torch.load(checkpoint, weights_only=True)["model_state"]["lang_encoder"]
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        assert in_file[key].keys() == saved[key].keys()
        assert all(torch.equal(in_file[key][n], saved[key][n]) for n in saved[key])

    torch.manual_seed(0)
    restored = tiny_model(adapters=adalora_cfg, trainable=FROZEN_PARTS)
    restored.load_training_state({"lang_encoder": in_file})
    back = adalora.allocator_state(restored)["lang_encoder"]
    assert all(torch.equal(back["exp_avg_unc"][n], saved["exp_avg_unc"][n]) for n in saved["exp_avg_unc"])
    assert back["rank_pattern"] == saved["rank_pattern"]

    torch.manual_seed(0)
    resumed = tiny_model(adapters=adalora_cfg, trainable=FROZEN_PARTS)
    runner, summary = train(tmp_path / "cut", resumed, n_train=20, resume_ckpt_path="latest")

    assert summary["status"] == "finished" and runner.global_step == 10
    expected = A.peft_models(whole)["lang_encoder"].peft_config["default"].rank_pattern
    assert expected is not None
    assert A.peft_models(resumed)["lang_encoder"].peft_config["default"].rank_pattern == expected
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name

"""Every adapter method the project accepts, through one table of checks, on the real tiny OpenFlamingo.

Checks (one test each, parametrised over ``ADAPTER_METHODS``): wrap, backward, save, reload, merge.
Each method's model is built and trained one optimizer step ONCE (the module-scoped ``trained`` fixture);
the checks read what it recorded, so they do not depend on their order.

The adapters go on all three adaptable parts (LM, cross-attention, Perceiver) with those parts' own
weights frozen, and the new-token rows of the (tied) embedding train, so every check also covers the
trained embedding rows that travel with the LM adapter. All models start from one OpenFlamingo
checkpoint whose gates are open: with the tiny model's closed gates (0) the cross-attention and the
Perceiver would not reach the logits, and their adapters would get no gradient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from lavis.common.config import read_yaml
from lavis.models import adapters as A
from lavis.models import build_model
from lavis.models.adapter_export import merge_and_export, openflamingo_state_dict, save_adapter

torch.set_num_threads(1)
TINY_YAML = "lavis/configs/models/openflamingo/tiny.yaml"
EMBED = "lang_encoder.model.embed_tokens.weight"  # tied with the LM head in the tiny LM


@dataclass(frozen=True)
class Method:
    tensors: frozenset[str]  # the names peft gives the adapter's own parameters in an adapted layer
    peft_type: str  # adapter_config.json's peft_type
    merge_skip: str | None = None  # why the method's adapter cannot be merged into plain weights (None: it can)


# A method the project accepts but this table lacks fails test_the_table_covers_every_method.
METHODS = {
    "lora": Method(frozenset({"lora_A", "lora_B"}), "LORA"),
    "adalora": Method(frozenset({"lora_A", "lora_B", "lora_E"}), "ADALORA"),
    "ia3": Method(frozenset({"ia3_l"}), "IA3"),
    "loha": Method(frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}), "LOHA"),
    "lokr": Method(frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}), "LOKR"),
}

# The modules adapted in each part (peft matches a target as the last components of a module name).
TARGETS = {
    "lang_encoder": ["q_proj", "v_proj", "down_proj"],
    "gated_cross_attn_layers": ["to_q", "to_kv", "to_out", "ff.3"],
    "perceiver": ["to_q", "to_kv", "to_out"],
}


def adapters_section(method: str) -> dict:
    return {
        "method": method,
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,  # a deterministic training forward
        "apply_to": list(TARGETS),
        "target_modules": TARGETS["lang_encoder"],
        "xattn_target_modules": TARGETS["gated_cross_attn_layers"],
        "perceiver_target_modules": TARGETS["perceiver"],
        "feedforward_modules": ["down_proj", "ff.3"],  # ia3 only: the feed-forward outputs, input-scaled
        # AdaLoRA: the one optimizer step (step 1 of 2) prunes ranks towards target_r and sets the rank
        # pattern, so the saved adapter is cut to the allocated ranks.
        "target_r": 2,
        "total_step": 2,
    }


# What trains besides the adapters: the new-token rows of the embedding (the parts' own weights are frozen).
TRAINABLE = {"perceiver": False, "gated_cross_attn": False, "new_token_embeddings": True, "lm_embeddings": False}


def tiny_section(**overrides) -> dict:
    cfg = dict(read_yaml(TINY_YAML).model)
    cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in cfg.items()}
    return {**cfg, **overrides}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An OpenFlamingo release checkpoint of the tiny model with open gates (a stand-in for a pretrained one)."""
    model = build_model(tiny_section(adapters={"method": None}))
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    path = tmp_path_factory.mktemp("pretrained") / "checkpoint.pt"
    torch.save(openflamingo_state_dict(model), path)
    return str(path)


def build(pretrained: str, method: str | None, checkpoint: str | None = None):
    """The tiny OpenFlamingo from ``pretrained`` (or ``checkpoint``) with ``method``'s adapters (None: none)."""
    adapters = adapters_section(method) if method else {"method": None}
    section = tiny_section(pretrained_checkpoint_path=checkpoint or pretrained, adapters=adapters, trainable=TRAINABLE)
    return build_model(section)


def make_batch(model):
    tok = model.tokenizer
    tok.padding_side = "right"
    text = ["<image>Output:a red circle<|endofchunk|>", "<image>Question:what shape? Short answer:square"]
    batch = tok(text, return_tensors="pt", padding="longest")
    gen = torch.Generator().manual_seed(0)
    vision_x = torch.randn(2, 1, 1, 3, model.image_size, model.image_size, generator=gen)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return vision_x, batch.input_ids, batch.attention_mask, labels


def flamingo_logits(model, batch) -> torch.Tensor:
    vision_x, ids, mask, _ = batch
    with torch.no_grad():
        return model(vision_x, ids, attention_mask=mask).logits


def lm_logits(lm, batch) -> torch.Tensor:
    """The language model alone (no images: the cross-attention hooks only act inside Flamingo's forward)."""
    _, ids, mask, _ = batch
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask).logits


def tuner_layers(model) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: layer for name, layer in model.named_modules() if isinstance(layer, BaseTunerLayer)}


def adapter_tensor(name: str) -> tuple[str, str]:
    """``(adapted module, tensor kind)`` of an adapter parameter: ``<module>.<kind>.default`` (a ParameterDict
    entry: ia3, loha, lokr, AdaLoRA's E) or ``<module>.<kind>.default.weight`` (a Linear: LoRA's A and B)."""
    module, kind, adapter = name.removesuffix(".weight").rsplit(".", 2)
    assert adapter == "default", f"{name}: not peft's default adapter"
    return module, kind


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, pretrained):
    """One method's model through one training step, with what each check needs recorded along the way."""
    method = request.param
    model = build(pretrained, method)
    batch = make_batch(model)
    init_logits = flamingo_logits(model.eval(), batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    model.train()
    _, ids, mask, labels = batch
    extras = model.training_loss_extras()
    loss = model(batch[0], ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    embed_before_step = dict(model.named_parameters())[EMBED].detach().clone()
    # weight_decay 0, as the runner gives the embedding: the frozen rows must stay bit-identical.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    optimizer.step()
    hook = model.optimizer_step_hook()
    if hook is not None:
        hook(1)  # AdaLoRA's rank allocation reads this step's gradients, so before zero_grad (as the runner does)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return SimpleNamespace(
        method=method,
        spec=METHODS[method],
        model=model,
        batch=batch,
        init_logits=init_logits,
        trainable=trainable,
        has_extras=extras is not None,
        has_hook=hook is not None,
        grads=grads,
        embed_before_step=embed_before_step,
        logits=flamingo_logits(model, batch),
    )


def test_the_table_covers_every_method():
    assert set(METHODS) == set(A.ADAPTER_METHODS)


@pytest.fixture(scope="module")
def plain_modules(pretrained) -> list[str]:
    """The module names of the model without adapters."""
    return [name for name, _ in build(pretrained, None).named_modules()]


def test_wrap(trained, plain_modules):
    """The adapter sits on exactly the targets of each part, and only its tensors (and the new rows) train."""
    model, spec = trained.model, trained.spec
    assert set(A.peft_models(model)) == set(TARGETS)
    expected = {
        name
        for part, targets in TARGETS.items()
        for name in plain_modules
        if name.startswith(part + ".") and name.endswith(tuple("." + t for t in targets))
    }
    layers = tuner_layers(model)
    assert set(layers) == expected
    assert all(type(layer).__module__.startswith(f"peft.tuners.{trained.method}.") for layer in layers.values())
    # The original module names survive the injection (the cross-attention hooks and checkpoints use them).
    assert "lang_encoder.model.layers.0.self_attn.q_proj.base_layer.weight" in dict(model.named_parameters())

    adapter = [n for n in trained.trainable if n != EMBED]
    assert EMBED in trained.trainable  # the new-token rows (the gradient mask is checked in test_backward)
    kinds = {}
    for name in adapter:
        module, kind = adapter_tensor(name)
        assert module in layers and kind in spec.tensors, f"{name} trains but is not an adapter tensor"
        kinds.setdefault(module, set()).add(kind)
    assert set(kinds) == set(layers), "every adapted module has trainable adapter tensors"
    assert set().union(*kinds.values()) == spec.tensors
    assert trained.has_extras == (trained.method == "adalora")  # AdaLoRA's orthogonality penalty
    assert trained.has_hook == (trained.method == "adalora")  # AdaLoRA's rank allocation


def test_backward(trained):
    """One training step: every adapted module gets a gradient, frozen weights none, the embedding its new rows."""
    model, grads = trained.model, trained.grads
    assert set(grads) == set(trained.trainable), "a frozen parameter got a gradient (or a trainable one none)"
    for module in tuner_layers(model):
        moved = [n for n in grads if n.startswith(module + ".") and grads[n].abs().sum() > 0]
        assert moved, f"no adapter tensor of {module} got a gradient"
    if trained.method == "adalora":  # the orthogonality penalty reaches P and Q even while E is still 0
        assert all(grads[n].abs().sum() > 0 for n in grads if ".lora_A." in n or ".lora_B." in n)
    new_rows = [model.tokenizer.convert_tokens_to_ids(t) for t in A.NEW_TOKENS]
    rows_with_grad = grads[EMBED].abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows_with_grad and set(rows_with_grad) <= set(new_rows)
    weight = dict(model.named_parameters())[EMBED]
    others = [i for i in range(weight.shape[0]) if i not in new_rows]
    assert torch.equal(weight[others], trained.embed_before_step[others])


def peft_name(name: str) -> str:
    """Our parameter name of an LM adapter tensor as peft's adapter_model.safetensors spells it."""
    return "base_model.model." + name.removeprefix("lang_encoder.").replace(".default.", ".").removesuffix(".default")


# peft checks AdaLoRA's rank pattern (keys naming lora_E tensors) with LoRA's rule (keys naming modules) and
# warns; AdaLoRA's loader then resizes the layers by that very pattern, which the logits check below proves.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match any targeted module")
# AdaLoRA may prune a module to rank 0; peft's save takes the empty A and B for unfetched FSDP shards and warns.
@pytest.mark.filterwarnings("ignore:.* LoRA tensor\\(s\\) have invalid shape")
def test_save(trained, pretrained, tmp_path):
    """save_adapter writes peft's format, which peft itself loads onto the plain LM to the same outputs."""
    from peft import PeftModel

    model = trained.model
    out = tmp_path / "adapter"
    save_adapter(model, str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == trained.spec.peft_type
    assert set(config["target_modules"]) == set(TARGETS["lang_encoder"])
    saved = safetensors.torch.load_file(str(out / "adapter_model.safetensors"))
    ours = {n: t for n, t in model.trainable_state_dict().items() if n.startswith("lang_encoder.")}
    # peft saves the tied LM head beside the embedding (the same matrix).
    assert set(saved) == {peft_name(n) for n in ours} | {"base_model.model.lm_head.weight"}
    assert torch.equal(saved["base_model.model.lm_head.weight"], ours[EMBED])
    if trained.method != "adalora":  # AdaLoRA's file holds its tensors cut to the allocated ranks
        for name, tensor in ours.items():
            assert torch.equal(saved[peft_name(name)], tensor), name
    else:
        kept = sum(sum(pattern) for pattern in config["rank_pattern"].values())
        saved_ranks = sum(t.shape[0] for k, t in saved.items() if ".lora_E" in k)
        assert kept == saved_ranks < sum(t.shape[0] for k, t in ours.items() if ".lora_E" in k)

    plain = build(pretrained, None).lang_encoder  # the LM before fine-tuning (resized vocabulary)
    loaded = PeftModel.from_pretrained(plain, str(out)).eval()
    torch.testing.assert_close(lm_logits(loaded, trained.batch), lm_logits(model.lang_encoder, trained.batch))


def test_reload(trained, pretrained, tmp_path):
    """A fresh model loading the trainable weights (and training state) gives the trained logits exactly."""
    assert not torch.allclose(trained.logits, trained.init_logits), "the step should move the model off its init"
    path = tmp_path / "trainable.pt"
    torch.save({"weights": trained.model.trainable_state_dict(), "state": trained.model.training_state()}, path)
    saved = torch.load(path, weights_only=True)
    fresh = build(pretrained, trained.method)
    fresh.load_trainable_state_dict(saved["weights"])
    fresh.load_training_state(saved["state"])
    assert torch.equal(flamingo_logits(fresh.eval(), trained.batch), trained.logits)
    assert fresh.training_state().keys() == trained.model.training_state().keys()


def test_merge(trained, pretrained, tmp_path):
    """The merged exports give the adapter model's logits (1e-5) and leave the adapter model untouched.

    ``merge_and_export``: the LM alone as a plain HF folder; the OpenFlamingo release file: every part
    merged, loaded into a model without adapters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trained.spec.merge_skip:
        pytest.skip(f"{trained.method}: {trained.spec.merge_skip}")
    model, batch = trained.model, trained.batch
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    merge_and_export(model, str(tmp_path / "merged"))
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    assert not any(part in n for n in lm.state_dict() for part in ("base_layer", *trained.spec.tensors))
    torch.testing.assert_close(lm_logits(lm, batch), lm_logits(model.lang_encoder, batch), rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert tokenizer.convert_tokens_to_ids(A.NEW_TOKENS) == model.tokenizer.convert_tokens_to_ids(A.NEW_TOKENS)

    release = tmp_path / "release.pt"
    torch.save(openflamingo_state_dict(model), release)
    merged = build(pretrained, None, checkpoint=str(release)).eval()
    torch.testing.assert_close(flamingo_logits(merged, batch), trained.logits, rtol=0, atol=1e-5)

    for name, param in model.named_parameters():  # merging copies; the adapter stays unmerged, bit for bit
        assert torch.equal(param, weights[name]), name
    assert torch.equal(flamingo_logits(model, batch), trained.logits)

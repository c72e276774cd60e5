"""Adapters, freezing policy and LM loading, on a tiny stand-in of the Flamingo network (CPU, seconds)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn

from lavis.common.errors import ConfigError
from lavis.models import adapters as A
from lavis.models import quantization as Q

torch.set_num_threads(1)

HIDDEN = 32
MEDIA_DIM = 16


def make_tokenizer():
    """A word-level HF fast tokenizer with Flamingo's added tokens (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(45)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_tokens(["<|endofchunk|>", "<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


def make_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, media):
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media).chunk(2, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(weights @ v)


class GatedBlock(nn.Module):
    """Named like OpenFlamingo's GatedCrossAttentionBlock: attn.{norm,to_q,to_kv,to_out}, ff.{0,1,3}, gates."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = Attention(dim)
        self.attn_gate = nn.Parameter(torch.tensor([0.1]))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )
        self.ff_gate = nn.Parameter(torch.tensor([0.1]))

    def forward(self, x, media):
        x = x + torch.tanh(self.attn_gate) * self.attn(x, media)
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class Perceiver(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, dim))
        self.layers = nn.ModuleList([Attention(dim)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = latents + layer(latents, x)
        return self.norm(latents)


class StandInFlamingo(nn.Module):
    """Just the attributes the adapter code relies on; the real network lives in lavis/models/flamingo."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.tokenizer = make_tokenizer()
        self.lang_encoder = make_llama(48, seed)
        self.lang_encoder.resize_token_embeddings(len(self.tokenizer))
        torch.manual_seed(seed + 1)
        self.vision_encoder = nn.Linear(8, MEDIA_DIM)
        self.perceiver = Perceiver(MEDIA_DIM)
        self.gated_cross_attn_layers = nn.ModuleDict({"0": GatedBlock(MEDIA_DIM), "1": GatedBlock(MEDIA_DIM)})

    def forward(self, vision_x, lang_x, labels):
        media = self.perceiver(self.vision_encoder(vision_x))
        x = media
        for block in self.gated_cross_attn_layers.values():
            x = block(x, media)
        out = self.lang_encoder(input_ids=lang_x, labels=labels)
        return out.loss + x.pow(2).mean()


def new_ids(model):
    return [model.tokenizer.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>")]


def make_batch(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lang_x = torch.randint(3, 48, (2, 10), generator=g)
    lang_x[:, 0] = new_ids(model)[1]  # <image> first, as in Flamingo prompts
    lang_x[:, 6] = new_ids(model)[0]
    return torch.randn(2, 3, 8, generator=g), lang_x


def param_groups(model, weight_decay=0.1):
    """The runner's contract policy: no decay for ndim < 2 or names with embed/norm/gate/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(word in name for word in ("embed", "norm", "gate", "bias"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_steps(model, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW(param_groups(model), lr=lr)
    vision_x, lang_x = make_batch(model)
    for _ in range(steps):
        loss = model(vision_x, lang_x, labels=lang_x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(lm, input_ids):
    with torch.no_grad():
        return lm(input_ids=input_ids).logits


# ---------------------------------------------------------------- freezing policy


def test_lora_trains_only_adapters_and_policy_parts():
    model = StandInFlamingo()
    A.apply_trainable_policy(model, A.AdapterConfig(method="lora", dropout=0.0), A.TrainableConfig())
    names = dict(model.named_modules())
    assert "lang_encoder.model.layers.0.self_attn.q_proj" in names  # original module names survive injection
    embed_name = "lang_encoder.model.embed_tokens.weight"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert (
            ".lora_" in name
            or name.startswith(("perceiver.", "gated_cross_attn_layers."))
            or name == embed_name
        ), name
    assert any(".self_attn.v_proj.lora_B." in n for n in trainable)
    assert not any(
        ".k_proj.lora_" in n for n in dict(model.named_parameters())
    )  # only q_proj, v_proj targeted
    assert {n for n in dict(model.named_parameters()) if n.startswith("perceiver.")} <= trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    after = dict(model.named_parameters())
    ids = new_ids(model)
    others = [i for i in range(after[embed_name].shape[0]) if i not in ids]
    for name, old in before.items():
        if name == embed_name:
            assert torch.equal(after[name][others], old[others])  # bitwise: AdamW with weight decay ran
            assert not torch.equal(after[name][ids], old[ids])
        elif name in trainable:
            assert not torch.equal(after[name], old), f"{name} should have trained"
        else:
            assert torch.equal(after[name], old), f"{name} is frozen but changed"


def test_policy_flags_and_summary():
    model = StandInFlamingo()
    cfg = A.TrainableConfig(perceiver=False, gated_cross_attn=False, new_token_embeddings=False)
    A.apply_trainable_policy(model, None, cfg)
    assert not any(p.requires_grad for p in model.parameters())

    model = StandInFlamingo()
    A.apply_trainable_policy(model, {"method": None}, {"perceiver": False, "lm_embeddings": True})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lang_encoder.model.embed_tokens.weight" in trainable
    assert not any(n.startswith("perceiver.") for n in trainable)
    summary = A.trainable_parameter_summary(model)
    embed = model.lang_encoder.get_input_embeddings().weight
    xattn = sum(p.numel() for p in model.gated_cross_attn_layers.parameters())
    assert summary["lang_encoder"]["trainable"] == embed.numel()
    assert summary["gated_cross_attn_layers"]["trainable"] == xattn
    assert summary["total"]["trainable"] == embed.numel() + xattn

    # The masked embedding counts only its two new rows.
    model = StandInFlamingo()
    A.apply_trainable_policy(model, None, A.TrainableConfig(perceiver=False, gated_cross_attn=False))
    assert A.trainable_parameter_summary(model)["lang_encoder"]["trainable"] == 2 * HIDDEN
    state = A.trainable_state_dict(model)
    assert list(state) == ["lang_encoder.model.embed_tokens.weight"]


def test_adapters_on_every_part_and_dictconfig_input():
    model = StandInFlamingo()
    cfg = OmegaConf.create(
        {"method": "lora", "apply_to": ["lang_encoder", "gated_cross_attn_layers", "perceiver"], "r": 2}
    )
    A.apply_trainable_policy(model, cfg, {"perceiver": False, "gated_cross_attn": False})
    trainable = set(A.trainable_state_dict(model))
    assert "gated_cross_attn_layers.1.attn.to_kv.lora_A.default.weight" in trainable
    assert "perceiver.layers.0.to_out.lora_B.default.weight" in trainable
    assert "gated_cross_attn_layers.0.attn.to_q.base_layer.weight" not in trainable
    assert set(A.peft_models(model)) == {"lang_encoder", "gated_cross_attn_layers", "perceiver"}
    with pytest.raises(RuntimeError, match="already applied"):
        A.apply_trainable_policy(model, cfg, None)


@pytest.mark.parametrize("method", A.ADAPTER_METHODS)
def test_each_peft_method_wraps_and_backpropagates(method):
    model = StandInFlamingo()
    cfg = A.AdapterConfig(
        method=method,
        r=4,
        target_r=2,
        total_step=10,
        apply_to=["lang_encoder", "gated_cross_attn_layers"],
        target_modules=["q_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj", "ff.3"],
        xattn_target_modules=["to_q", "to_kv", "ff.3"],
    )
    A.apply_trainable_policy(model, cfg, A.TrainableConfig(perceiver=False, gated_cross_attn=False))
    base = model.lang_encoder.model.layers[0].self_attn.q_proj
    assert base.__class__.__module__.startswith("peft.tuners.")
    vision_x, lang_x = make_batch(model)
    loss = model(vision_x, lang_x, labels=lang_x)
    reg = A.adapter_regularization_loss(model)
    assert (reg is not None) == (method == "adalora")
    if reg is not None:
        loss = loss + reg
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("gated_cross_attn_layers.") for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    A.update_adapter_budget(model, global_step=1)  # AdaLoRA's allocation; a no-op for the others


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("train_new_rows", [False, True])
def test_saved_adapter_loads_onto_plain_llama(tmp_path, train_new_rows):
    from peft import PeftModel

    model = StandInFlamingo(seed=3)
    plain = copy.deepcopy(model.lang_encoder)  # the untouched (resized) LLaMA
    trainable = A.TrainableConfig(new_token_embeddings=train_new_rows)
    A.apply_trainable_policy(model, A.AdapterConfig(method="lora", dropout=0.0), trainable)
    train_steps(model)
    model.eval()
    out = tmp_path / "adapter"
    A.save_adapter(model, str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    saved = safetensors.torch.load_file(str(out / "adapter_model.safetensors"))
    # The trained embedding rows travel with the adapter; otherwise only adapter weights do.
    assert any("embed_tokens" in k for k in saved) == train_new_rows
    assert all("lora_" in k or "embed_tokens" in k or "lm_head" in k for k in saved)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert os.listdir(tmp_path) == ["adapter"]  # no temp directory left behind

    loaded = PeftModel.from_pretrained(plain, str(out)).eval()
    _, lang_x = make_batch(model)
    expected = logits(model.lang_encoder, lang_x)
    torch.testing.assert_close(logits(loaded, lang_x), expected, rtol=0, atol=1e-6)
    with loaded.disable_adapter():  # the adapter (and, if trained, the new rows) really carry the change
        assert not torch.allclose(logits(loaded, lang_x), expected, atol=1e-4) or train_new_rows


def test_adapter_changes_outputs_and_save_overwrites(tmp_path):
    model = StandInFlamingo()
    _, lang_x = make_batch(model)
    before = logits(model.lang_encoder, lang_x)
    A.apply_trainable_policy(model, {"method": "lora", "dropout": 0.0}, {"new_token_embeddings": False})
    torch.testing.assert_close(logits(model.lang_encoder, lang_x), before)  # LoRA starts as the identity
    train_steps(model)
    assert not torch.allclose(logits(model.lang_encoder, lang_x), before)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    A.save_adapter(model, str(out))  # replaces the whole directory
    assert not (out / "stale.txt").exists()


def test_merge_and_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = StandInFlamingo(seed=5)
    A.apply_trainable_policy(model, A.AdapterConfig(method="lora", dropout=0.0), A.TrainableConfig())
    train_steps(model)
    model.eval()
    _, lang_x = make_batch(model)
    expected = logits(model.lang_encoder, lang_x)
    weights_before = {n: p.detach().clone() for n, p in model.lang_encoder.named_parameters()}

    A.merge_and_export(model, str(tmp_path / "merged"))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    assert not any("lora" in n or "base_layer" in n for n in exported.state_dict())
    torch.testing.assert_close(logits(exported, lang_x), expected, rtol=0, atol=1e-5)
    # The training model keeps its unmerged adapter, bit for bit.
    for name, param in model.lang_encoder.named_parameters():
        assert torch.equal(param, weights_before[name]), name
    assert torch.equal(logits(model.lang_encoder, lang_x), expected)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == new_ids(model)[1]


@pytest.mark.parametrize("method", ["ia3", "loha"])
def test_merge_and_export_other_methods(tmp_path, method):
    from transformers import AutoModelForCausalLM

    model = StandInFlamingo()
    A.apply_trainable_policy(model, {"method": method, "dropout": 0.0}, {"new_token_embeddings": False})
    train_steps(model)
    model.eval()
    _, lang_x = make_batch(model)
    A.merge_and_export(model, str(tmp_path / "m"))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), local_files_only=True).eval()
    torch.testing.assert_close(
        logits(exported, lang_x), logits(model.lang_encoder, lang_x), rtol=0, atol=1e-5
    )


def test_export_without_lm_adapter_is_a_user_error(tmp_path):
    model = StandInFlamingo()
    A.apply_trainable_policy(model, {"method": "lora", "apply_to": ["perceiver"]}, None)
    with pytest.raises(ConfigError, match="no adapter"):
        A.save_adapter(model, str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="no adapter"):
        A.merge_and_export(model, str(tmp_path / "m"))
    assert not (tmp_path / "a").exists()


def test_atomic_directory_keeps_old_copy_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "good.txt").write_text("complete")
    with pytest.raises(ValueError):
        with A.atomic_directory(str(target)) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("partial")
            raise ValueError("crash while writing")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(target)) == ["good.txt"]


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"method": "prefix"}, "known methods: lora, ia3, loha, lokr, adalora"),
        ({"method": "lora", "apply_to": ["vision_encoder"]}, "apply_to: unknown part"),
        ({"method": "adalora"}, "total_step"),
        ({"method": "adalora", "total_step": 10, "target_r": 20}, "target_r"),
        ({"method": "lora", "rank": 4}, "unknown key"),
        ({"method": "lora", "target_modules": ["nope_proj"]}, "cannot apply lora to lang_encoder"),
        ({"method": "ia3", "feedforward_modules": ["down_proj"]}, "feedforward_modules"),
    ],
)
def test_bad_adapter_config_is_a_config_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        A.apply_trainable_policy(StandInFlamingo(), cfg, None)


def test_missing_new_tokens_is_a_config_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = StandInFlamingo()
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<|endofchunk|>": 1}, unk_token="<unk>"))
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ConfigError, match="no added token '<image>'"):
        A.apply_trainable_policy(model, None, A.TrainableConfig())


# ---------------------------------------------------------------- loading the LM


def test_load_language_model_in_fp16(tmp_path):
    lm = make_llama(40)
    lm.save_pretrained(str(tmp_path / "llama"))
    loaded = Q.load_language_model(str(tmp_path / "llama"), "fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight, lm.model.embed_tokens.weight.half(), rtol=0, atol=0
    )


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantization_on_cpu_is_a_clear_error(tmp_path, mode):
    make_llama(40).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ConfigError, match=f"quantization='{mode}' needs a CUDA GPU"):
        Q.load_language_model(str(tmp_path / "llama"), "fp16", quantization=mode)


def test_quantization_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match="bitsandbytes"):
        Q.check_quantization_available("4bit")
    with pytest.raises(ConfigError, match="not supported"):
        Q.check_quantization_available("2bit")


def test_bf16_on_a_gpu_without_bf16_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError, match="V100.*no native bfloat16"):
        Q.check_dtype_supported(torch.bfloat16, "cuda:0")
    Q.check_dtype_supported(torch.float16, "cuda:0")  # fp16 is fine there
    Q.check_dtype_supported(torch.bfloat16, "cpu")


def test_bad_paths_and_dtypes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        Q.load_language_model(str(tmp_path / "missing"), "fp16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        Q.load_language_model(str(tmp_path / "empty"), "fp16")
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        Q.resolve_dtype("fp8")
    assert Q.resolve_dtype("bf16") is torch.bfloat16

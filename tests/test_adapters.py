"""Adapters, freezing policy and LM loading, on a tiny stand-in of the Flamingo network (CPU, seconds).

The export (save_adapter, merge_and_export) is tested in test_adapter_export.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from standin_flamingo import (
    HIDDEN,
    StandInFlamingo,
    make_llama,
    new_ids,
    train_steps,
)

from lavis.common.errors import ConfigError
from lavis.models import adapters as A
from lavis.models import language_model as Q

torch.set_num_threads(1)


# ---------------------------------------------------------------- freezing policy


def test_lora_trains_only_adapters_and_policy_parts():
    model = StandInFlamingo()
    A.apply_trainable_policy(model, A.AdapterConfig(method="lora", dropout=0.0), A.TrainableConfig())
    names = dict(model.named_modules())
    assert "lang_encoder.model.layers.0.self_attn.q_proj" in names  # original module names survive injection
    embed_name = "lang_encoder.model.embed_tokens.weight"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".lora_" in name or name.startswith(("perceiver.", "gated_cross_attn_layers.")) or name == embed_name, (
            name
        )
    assert any(".self_attn.v_proj.lora_B." in n for n in trainable)
    assert not any(".k_proj.lora_" in n for n in dict(model.named_parameters()))  # only q_proj, v_proj targeted
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


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"method": "prefix"}, "known methods: lora, ia3, loha, lokr, adalora"),
        ({"method": "lora", "apply_to": ["vision_encoder"]}, "apply_to: unknown part"),
        ({"method": "adalora"}, "total_step"),
        ({"method": "adalora", "total_step": 10, "target_r": 20}, "target_r"),
        ({"method": "adalora", "total_step": 1}, r"tfinal \(1 - 0\) must be at least 2"),
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
    loaded = Q.load_language_model(str(tmp_path / "llama"), "float16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    torch.testing.assert_close(loaded.model.embed_tokens.weight, lm.model.embed_tokens.weight.half(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantization_on_cpu_is_a_clear_error(tmp_path, mode):
    make_llama(40).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ConfigError, match=f"quantization='{mode}' needs a CUDA GPU"):
        Q.load_language_model(str(tmp_path / "llama"), "float16", quantization=mode)


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
        Q.load_language_model(str(tmp_path / "missing"), "float16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        Q.load_language_model(str(tmp_path / "empty"), "float16")
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        Q.resolve_dtype("fp8")
    assert Q.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="known names: bfloat16, float16, float32"):
        Q.resolve_dtype("bf16")  # run.amp's names are not dtype names

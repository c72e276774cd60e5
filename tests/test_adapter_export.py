"""Export of the LM adapter (lavis/models/adapter_export.py): peft format and merged plain HF model."""

from __future__ import annotations

import copy
import os

import pytest
import safetensors.torch
import torch
from standin_flamingo import (
    StandInFlamingo,
    logits,
    make_batch,
    train_steps,
)

from lavis.common.errors import ConfigError
from lavis.common.fileio import atomic_directory
from lavis.models import adapters as A
from lavis.models.adapter_export import merge_and_export, save_adapter

torch.set_num_threads(1)


# ---------------------------------------------------------------- export


def test_saved_adapter_without_trained_rows_loads_onto_plain_llama(tmp_path):
    """The adapter alone when the embedding does not train (every method, with trained rows, is in
    test_adapter_conformance.py)."""
    from peft import PeftModel

    model = StandInFlamingo(seed=3)
    plain = copy.deepcopy(model.lang_encoder)  # the untouched (resized) LLaMA
    trainable = A.TrainableConfig(new_token_embeddings=False)
    A.apply_trainable_policy(model, A.AdapterConfig(method="lora", dropout=0.0), trainable)
    train_steps(model)
    model.eval()
    out = tmp_path / "adapter"
    save_adapter(model, str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    saved = safetensors.torch.load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # no embedding matrix travels with it
    assert os.listdir(tmp_path) == ["adapter"]  # no temp directory left behind

    loaded = PeftModel.from_pretrained(plain, str(out)).eval()
    _, lang_x = make_batch(model)
    expected = logits(model.lang_encoder, lang_x)
    torch.testing.assert_close(logits(loaded, lang_x), expected, rtol=0, atol=1e-6)
    with loaded.disable_adapter():  # the adapter really carries the change
        assert not torch.allclose(logits(loaded, lang_x), expected, atol=1e-4)


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
    save_adapter(model, str(out))  # replaces the whole directory
    assert not (out / "stale.txt").exists()


def test_export_without_lm_adapter_is_a_user_error(tmp_path):
    model = StandInFlamingo()
    A.apply_trainable_policy(model, {"method": "lora", "apply_to": ["perceiver"]}, None)
    with pytest.raises(ConfigError, match="no adapter"):
        save_adapter(model, str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="no adapter"):
        merge_and_export(model, str(tmp_path / "m"))
    assert not (tmp_path / "a").exists()


def test_atomic_directory_keeps_old_copy_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "good.txt").write_text("complete")
    with pytest.raises(ValueError):
        with atomic_directory(str(target)) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("partial")
            raise ValueError("crash while writing")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(target)) == ["good.txt"]

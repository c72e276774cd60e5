"""``python -m lavis.export`` (lavis/export.py): each format round-trips to the fine-tuned model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, subprocess_env

from lavis.export import export, main
from lavis.models import build_model, load_model_and_preprocess
from lavis.models.adapter_export import openflamingo_state_dict
from lavis.models.flamingo.checkpoint_io import load_openflamingo_checkpoint

REF = Path(__file__).parent / "fixtures" / "openflamingo_reference"


def lm_logits(lm, ids) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=ids).logits


def flamingo_logits(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(2, 1, 1, 3, model.image_size, model.image_size, generator=gen)
    ids = model.tokenizer(
        ["<image>Output:a red circle", "<image>Question:what? Short answer:"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        return model(vision_x, ids["input_ids"], attention_mask=ids["attention_mask"]).logits


@pytest.fixture(scope="module")
def fine_tuned(trained_checkpoint):
    model, _, _ = load_model_and_preprocess(checkpoint=trained_checkpoint)
    return model


def sample_ids(model) -> torch.Tensor:
    return model.tokenizer(["<image>Output:a blue square<|endofchunk|>"], return_tensors="pt")["input_ids"]


def test_peft_export_loads_onto_the_plain_lm_and_back_into_the_framework(tmp_path, trained_checkpoint, fine_tuned):
    from peft import PeftModel

    out = tmp_path / "adapter"
    main(["--checkpoint", str(trained_checkpoint), "--out", str(out), "--format", "peft"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the config's model.lang_encoder_path
    plain, _, _ = load_model_and_preprocess("openflamingo", "tiny")  # no adapter: the plain (resized) LLaMA
    ids = sample_ids(fine_tuned)
    loaded = PeftModel.from_pretrained(plain.lang_encoder, str(out)).eval()
    torch.testing.assert_close(lm_logits(loaded, ids), lm_logits(fine_tuned.lang_encoder, ids), rtol=0, atol=1e-5)
    # The folder is also a checkpoint for this framework (evaluate.py, lavis.predict): the whole model is back.
    again, _, _ = load_model_and_preprocess(checkpoint=out)
    torch.testing.assert_close(flamingo_logits(again), flamingo_logits(fine_tuned), rtol=0, atol=1e-5)


def test_merged_export_loads_with_auto_model(tmp_path, trained_checkpoint, fine_tuned):
    from transformers import AutoModelForCausalLM

    export(str(trained_checkpoint), str(tmp_path / "merged"), "merged")
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    ids = sample_ids(fine_tuned)
    torch.testing.assert_close(lm_logits(lm, ids), lm_logits(fine_tuned.lang_encoder, ids), rtol=0, atol=1e-5)


def reference_model(**overrides):
    """The fixture's OpenFlamingo; seeded, since the LM head's rows of the added tokens are drawn at random
    (the release file does not hold them: two builds share them only through the seed)."""
    torch.manual_seed(3)
    cfg = {
        "arch": "openflamingo",
        "model_type": "llama7b_vitl14",
        "clip_vision_encoder_path": str(REF / "vision" / "ViT-Dev-P16.json"),
        "clip_vision_encoder_pretrained": str(REF / "vision" / "ViT-Dev-P16.pt"),
        "lang_encoder_path": str(REF / "llama"),
        "tokenizer_path": str(REF / "llama"),
        "cross_attn_every_n_layers": 1,
        "pretrained_checkpoint_path": str(REF / "checkpoint.pt"),
        "xattn_semantics": "v1",
        **overrides,
    }
    return build_model(cfg).eval()


def perturb_trainable(model, seed: int = 1) -> None:
    """Stand-in for training: every trainable tensor moves (LoRA's B leaves zero, the gates open)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_openflamingo_export_has_the_release_key_layout_and_reloads_to_the_same_outputs(tmp_path):
    release_keys = set(torch.load(REF / "checkpoint.pt", weights_only=True))
    # Perceiver, cross-attention and all embeddings trained, no LM adapter: exactly the release's key set.
    model = reference_model(trainable={"perceiver": True, "gated_cross_attn": True, "lm_embeddings": True})
    perturb_trainable(model)
    state = openflamingo_state_dict(model)
    assert set(state) == release_keys
    path = tmp_path / "of" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save(state, path)
    fresh = reference_model(pretrained_checkpoint_path=str(path))
    torch.testing.assert_close(flamingo_logits(fresh), flamingo_logits(model), rtol=0, atol=1e-6)

    # With LoRA on the LM: the release keys plus the merged weights of exactly the adapted modules.
    lora = reference_model(
        adapters={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    )
    perturb_trainable(lora)
    state = openflamingo_state_dict(lora)
    extra = set(state) - release_keys
    assert release_keys <= set(state) and extra
    assert all(".decoder_layer.self_attn." in k and k.endswith(("q_proj.weight", "v_proj.weight")) for k in extra)
    torch.save(state, path)
    fresh = reference_model(pretrained_checkpoint_path=str(path))
    assert load_openflamingo_checkpoint(fresh, path)  # every key maps to a parameter: none unexpected
    torch.testing.assert_close(flamingo_logits(fresh), flamingo_logits(lora), rtol=1e-5, atol=1e-5)


def test_openflamingo_export_of_a_training_run_through_the_cli(tmp_path, trained_checkpoint, fine_tuned):
    import subprocess
    import sys

    out = tmp_path / "release"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lavis.export",
            "--checkpoint",
            str(trained_checkpoint.parent.parent),
            "--out",
            str(out),
            "--format",
            "openflamingo",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_ok(proc)
    assert f"exported (openflamingo): {out / 'checkpoint.pt'}" in proc.stdout
    # The plain tiny model with the file as its pretrained checkpoint is the fine-tuned model (LoRA merged).
    back, _, _ = load_model_and_preprocess(checkpoint=out / "checkpoint.pt", model_type="tiny")
    torch.testing.assert_close(flamingo_logits(back), flamingo_logits(fine_tuned), rtol=1e-5, atol=1e-5)


def test_an_unknown_format_is_refused(tmp_path, trained_checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "x"), "--format", "zip"])
    assert not (tmp_path / "x").exists()

"""Our OpenFlamingo reproduces the reference implementation's outputs on a tiny random model.

Fixtures: tests/fixtures/openflamingo_reference (see its README): logits, greedy / beam generations
(incl. the eos variant and length_penalty=-2), tokenizer ids, vision tokens, Perceiver outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lavis.common.errors import CheckpointError
from lavis.models import build_model
from lavis.models.flamingo.checkpoint_io import load_openflamingo_checkpoint, read_checkpoint
from lavis.models.flamingo.cross_attention import media_index_v1
from lavis.models.flamingo.vision import patch_tokens

REF = Path(__file__).parent / "fixtures" / "openflamingo_reference"
CASES = ["batch_leftpad", "fewshot_output"]
ORIGINAL_VOCAB = 640  # logit columns of the added tokens are random in the reference (README §4)


def reference_config(**overrides) -> dict:
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
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_model(reference_config()).eval()


@pytest.fixture(scope="module")
def eos_model():
    m = build_model(reference_config()).eval()
    load_openflamingo_checkpoint(m, REF / "extra" / "lm_head_eos_variant.pt", require_flamingo_keys=False)
    return m


def load_case(name: str):
    d = REF / "cases" / name
    return (
        torch.from_numpy(np.load(d / "vision_x.npy")),
        torch.from_numpy(np.load(d / "input_ids.npy")),
        torch.from_numpy(np.load(d / "attention_mask.npy")),
    )


def test_tokenizer_ids_match_legacy_llama(model):
    ref = json.loads((REF / "tokenizer_ids.json").read_text())
    for case in ref["cases"]:
        assert model.tokenizer(case["text"]).input_ids == case["input_ids"], case["text"]
    tok = model.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>", "<PAD>")] == [640, 641, 642]
    for name in CASES:
        prompts = json.loads((REF / "cases" / name / "case.json").read_text())["prompts"]
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding="longest")
        _, ids, mask = load_case(name)
        assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)


def test_image_processor_matches_reference(model):
    spec = json.loads((REF / "preprocess" / "preprocess.json").read_text())
    for item in spec["images"]:
        got = model.image_processor(Image.open(REF / item["png"]))
        np.testing.assert_allclose(got.numpy(), np.load(REF / item["expected"]), atol=1e-5)
    vision_x, _, _ = load_case("batch_leftpad")
    got = model.image_processor(Image.open(REF / "cases" / "batch_leftpad" / "images" / "b1_t2.png"))
    np.testing.assert_allclose(got.numpy(), vision_x[1, 2, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_vision_tokens_and_perceiver(model, name):
    vision_x, _, _ = load_case(name)
    b, t = vision_x.shape[:2]
    with torch.no_grad():
        tokens = patch_tokens(model.vision_encoder, vision_x.flatten(0, 2))
        latents = model.encode_vision(vision_x)
    expected_tokens = np.load(REF / "cases" / name / "debug_vision_tokens.npy")
    np.testing.assert_allclose(tokens.reshape(expected_tokens.shape).numpy(), expected_tokens, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        latents.numpy(), np.load(REF / "cases" / name / "debug_perceiver_out.npy"), atol=1e-4, rtol=1e-4
    )
    assert latents.shape == (b, t, 64, 48)


@pytest.mark.parametrize("name", CASES)
def test_logits(model, name):
    vision_x, ids, mask = load_case(name)
    with torch.no_grad():
        logits = model(vision_x, ids, mask).logits
    expected = torch.from_numpy(np.load(REF / "cases" / name / "logits.npy"))
    valid = mask.bool()  # pad query rows are implementation-defined in the reference
    torch.testing.assert_close(
        logits[valid][:, :ORIGINAL_VOCAB], expected[valid][:, :ORIGINAL_VOCAB], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind,num_beams", [("greedy", 1), ("beam3", 3)])
def test_generation(model, name, kind, num_beams):
    vision_x, ids, mask = load_case(name)
    expected = np.load(REF / "cases" / name / f"{kind}_sequences.npy")
    # The reference fills finished rows with the LM's pad id 0; the fixtures include the prompt.
    out = model.generate(vision_x, ids, mask, num_beams=num_beams, max_new_tokens=10, pad_token_id=0)
    np.testing.assert_array_equal(out.numpy(), expected[:, ids.shape[1] :])


def test_eos_variant_logits(eos_model):
    vision_x, ids, mask = load_case("batch_leftpad")
    with torch.no_grad():
        logits = eos_model(vision_x, ids, mask).logits
    expected = torch.from_numpy(np.load(REF / "cases" / "batch_leftpad" / "eos_variant" / "logits.npy"))
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("greedy", {"num_beams": 1}),
        ("beam3", {"num_beams": 3}),
        ("beam3_lp-2", {"num_beams": 3, "length_penalty": -2.0}),
    ],
)
def test_eos_variant_generation(eos_model, kind, kwargs):
    vision_x, ids, mask = load_case("batch_leftpad")
    expected = np.load(REF / "cases" / "batch_leftpad" / "eos_variant" / f"{kind}_sequences.npy")
    out = eos_model.generate(vision_x, ids, mask, max_new_tokens=10, pad_token_id=0, **kwargs)
    np.testing.assert_array_equal(out.numpy(), expected[:, ids.shape[1] :])
    assert (out == 640).any(), "the eos variant must stop on <|endofchunk|>"


def test_beam_length_penalty_changes_row_1(eos_model):
    vision_x, ids, mask = load_case("batch_leftpad")
    lp1 = eos_model.generate(vision_x, ids, mask, num_beams=3, max_new_tokens=10, length_penalty=1.0)
    lp2 = eos_model.generate(vision_x, ids, mask, num_beams=3, max_new_tokens=10, length_penalty=-2.0)
    assert not torch.equal(lp1[1], lp2[1]) and torch.equal(lp1[0], lp2[0])
    # Default padding after eos is the tokenizer's <PAD>.
    assert lp2[1, 4:].eq(eos_model.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("name", CASES)
def test_media_index_v1_matches_reference(name):
    case = json.loads((REF / "cases" / name / "case.json").read_text())
    _, ids, _ = load_case(name)
    assert media_index_v1(ids, 641).tolist() == case["media_index_per_token_v1"]


def test_perturbing_an_image_changes_logits_from_the_reference_position(model):
    case = json.loads((REF / "cases" / "batch_leftpad" / "case.json").read_text())
    expected = case["first_valid_position_whose_logits_change_when_image_t_of_row_b_is_perturbed"]
    vision_x, ids, mask = load_case("batch_leftpad")
    with torch.no_grad():
        base = model(vision_x, ids, mask).logits
        for b, row in enumerate(expected):  # None: the image is never attended
            for t, position in enumerate(row):
                perturbed = vision_x.clone()
                perturbed[b, t] += 0.5
                changed = (model(perturbed, ids, mask).logits[b] - base[b]).abs().amax(-1) > 1e-5
                changed &= mask[b].bool()
                first = int(changed.nonzero()[0]) if changed.any() else None
                assert first == position, (b, t)


def test_checkpoint_aliases_and_wrappers(tmp_path, model):
    state = read_checkpoint(REF / "checkpoint.pt")
    wrapped = {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    names = load_openflamingo_checkpoint(model, tmp_path / "wrapped.pt")
    assert "gated_cross_attn_layers.2.attn_gate" in names and "lang_encoder.model.embed_tokens.weight" in names
    assert torch.allclose(model.gated_cross_attn_layers["0"].attn_gate, torch.tensor([0.8]))


def test_checkpoint_missing_key_is_named(tmp_path):
    m = build_model(reference_config(pretrained_checkpoint_path=None))
    state = read_checkpoint(REF / "checkpoint.pt")
    del state["perceiver.layers.3.0.to_q.weight"]
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"missing 1 expected.*perceiver\.layers\.3\.0\.to_q\.weight"):
        load_openflamingo_checkpoint(m, tmp_path / "ckpt.pt")


def test_checkpoint_wrong_shape_is_named(tmp_path):
    m = build_model(reference_config(pretrained_checkpoint_path=None))
    state = read_checkpoint(REF / "checkpoint.pt")
    state["lang_encoder.gated_cross_attn_layers.1.attn.to_kv.weight"] = torch.zeros(1024, 96)
    state["lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_kv.weight"] = torch.zeros(1024, 96)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"to_kv\.weight: checkpoint \(1024, 96\) vs model"):
        load_openflamingo_checkpoint(m, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_openflamingo_checkpoint(m, tmp_path / "nope.pt")

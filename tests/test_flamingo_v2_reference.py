"""Our OpenFlamingo reproduces the v2 reference implementation on tiny random MPT and GPT-NeoX models.

Fixtures: tests/fixtures/openflamingo_v2_reference (see its README): logits (all 503 columns), greedy and
beam generations (incl. the eos variant and length_penalty 0.0), cached-scoring log-likelihoods, the
tokenizer, vision tokens, Perceiver outputs, per-token media indices; and the v2 checkpoint layout.
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
from lavis.models.flamingo.cross_attention import media_index_v2
from lavis.models.flamingo.vision import patch_tokens

torch.set_num_threads(1)
REF = Path(__file__).parent / "fixtures" / "openflamingo_v2_reference"
FAMILIES = ["mpt", "gptneox"]
GEN_CASES = ["interleaved_leftpad", "vqa_fewshot"]
EOC = 500
# Logit tolerance: atol = rtol = 1e-4 (fixture README §6) but for GPT-NeoX (below). Our forward is
# bit-identical, layer by layer, to the reference code (open_flamingo 2.0.1, transformers 4.36.2, open_clip
# 2.16.0, torch 2.14.1, fp32 CPU) run on the same machine, so what is left is the machine that made the
# fixtures: run on this project's machines (2-core x86, AVX2) the reference itself differs from its own
# fixtures by max |d logit| 6.7e-5 / 3.2e-5 / 4.3e-5 (MPT interleaved_leftpad / vqa_fewshot / cached_scoring)
# and 7.1e-5 / 1.5e-4 / 3.8e-5 (GPT-NeoX), with bit-identical vision tokens but a Perceiver output already
# 2.0e-6 apart; the GPT-NeoX model's deliberately sharp attention amplifies such rounding ~100x. Only GPT-NeoX
# vqa_fewshot exceeds 1e-4 (|d| - 1e-4 |x| up to 1.29e-4), for the reference as for us. Greedy and beam ids
# match exactly and the log-likelihoods within 1e-4 everywhere.
# On an AVX-512 Xeon (with AMX; torch's CPU capability AVX512) the kernels round differently again and the
# GPT-NeoX logits of interleaved_leftpad and its eos variant move up to 3.7e-4 from the fixtures (logits up
# to 10.6, so 3.5e-5 of their scale) while MPT stays within 1e-4 and every generated id still matches:
# GPT-NeoX's tolerance is 5e-4 on every case.
LOGIT_TOL = {"gptneox": 5e-4}
DEFAULT_LOGIT_TOL = 1e-4


def v2_config(family: str, **overrides) -> dict:
    cfg = {
        "arch": "openflamingo",
        "model_type": "mpt7b_vitl14" if family == "mpt" else "rpj3b_vitl14",
        "clip_vision_encoder_path": str(REF / "vision" / "ViT-V2Dev-P8.json"),
        "clip_vision_encoder_pretrained": str(REF / "vision" / "ViT-V2Dev-P8.pt"),
        "lang_encoder_path": str(REF / family / "lm"),
        "tokenizer_path": str(REF / family / "lm"),
        "cross_attn_every_n_layers": 1 if family == "mpt" else 2,
        "pretrained_checkpoint_path": str(REF / family / "checkpoint.pt"),
        "perceiver": {"depth": 6, "heads": 8, "dim_head": 64, "num_latents": 64, "ff_mult": 4},
        "cross_attention": {"heads": 8, "dim_head": 64, "ff_mult": 4},
        "xattn_semantics": "v2",
        "frozen_dtype": "float32",
        "adapters": {"method": None},
        "gradient_checkpointing": False,
    }
    cfg.update(overrides)
    return cfg


_MODELS: dict = {}


def model_for(family: str, eos: bool = False):
    key = (family, eos)
    if key not in _MODELS:
        model = build_model(v2_config(family)).eval()
        if eos:
            load_openflamingo_checkpoint(
                model, REF / family / "extra" / "eos_variant_override.pt", require_flamingo_keys=False
            )
        _MODELS[key] = model
    return _MODELS[key]


def load_case(family: str, name: str):
    d = REF / family / "cases" / name
    return tuple(torch.from_numpy(np.load(d / f)) for f in ("vision_x.npy", "input_ids.npy", "attention_mask.npy"))


def assert_close(got, expected, tol=1e-4):
    np.testing.assert_allclose(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_and_special_ids(family):
    tok = model_for(family).tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>", "<PAD>")] == [500, 501, 502]
    assert len(tok) == 503 and tok.pad_token == "<PAD>"
    for name, case in json.loads((REF / "tokenizer_ids.json").read_text())["strings"].items():
        assert tok(case["text"]).input_ids == case["input_ids"], name
    for name in [*GEN_CASES, "cached_scoring"]:
        prompts = json.loads((REF / family / "cases" / name / "case.json").read_text())["prompts"]
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding="longest")
        _, ids, mask = load_case(family, name)
        assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)


def test_image_processor():
    model = model_for("mpt")
    for item in json.loads((REF / "preprocess" / "preprocess.json").read_text())["images"]:
        got = model.image_processor(Image.open(REF / "preprocess" / item["png"]))
        np.testing.assert_allclose(got.numpy(), np.load(REF / "preprocess" / item["npy"]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tokens_and_perceiver(family):
    model = model_for(family)
    vision_x, _, _ = load_case(family, "interleaved_leftpad")
    d = REF / family / "cases" / "interleaved_leftpad"
    with torch.no_grad():
        tokens = patch_tokens(model.vision_encoder, vision_x.flatten(0, 2))
        latents = model.encode_vision(vision_x)
    expected = np.load(d / "debug_vision_tokens.npy")
    assert_close(tokens.reshape(expected.shape).numpy(), expected)
    assert_close(latents.numpy(), np.load(d / "debug_perceiver_out.npy"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", [*GEN_CASES, "cached_scoring"])
def test_logits_all_columns(family, name):
    model = model_for(family)
    vision_x, ids, mask = load_case(family, name)
    with torch.no_grad():
        logits = model(vision_x, ids, mask).logits
    file = "context_logits.npy" if name == "cached_scoring" else "logits.npy"
    expected = np.load(REF / family / "cases" / name / file)
    valid = mask.bool().numpy()  # pad query rows are implementation-defined
    assert logits.shape[-1] == 503
    assert_close(logits.numpy()[valid], expected[valid], LOGIT_TOL.get(family, DEFAULT_LOGIT_TOL))


def expected_new(path: Path, prompt_len: int) -> np.ndarray:
    return np.load(path)[:, prompt_len:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name,kind,kwargs",
    [
        ("interleaved_leftpad", "greedy", {"num_beams": 1}),
        ("interleaved_leftpad", "beam3", {"num_beams": 3}),
        ("vqa_fewshot", "greedy", {"num_beams": 1}),
        ("vqa_fewshot", "beam3_lp0", {"num_beams": 3, "length_penalty": 0.0}),
    ],
)
def test_generation_ids_exact(family, name, kind, kwargs):
    model = model_for(family)
    vision_x, ids, mask = load_case(family, name)
    expected = expected_new(REF / family / "cases" / name / f"{kind}_sequences.npy", ids.shape[1])
    # The reference fills finished rows with the eos it was given (<|endofchunk|>), not <PAD>.
    out = model.generate(vision_x, ids, mask, max_new_tokens=8, pad_token_id=EOC, **kwargs)
    np.testing.assert_array_equal(out.numpy()[:, : expected.shape[1]], expected)
    assert (out.numpy()[:, expected.shape[1] :] == EOC).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_variant(family):
    model = model_for(family, eos=True)
    vision_x, ids, mask = load_case(family, "interleaved_leftpad")
    d = REF / family / "cases" / "interleaved_leftpad" / "eos_variant"
    with torch.no_grad():
        logits = model(vision_x, ids, mask).logits
    valid = mask.bool().numpy()
    assert_close(logits.numpy()[valid], np.load(d / "logits.npy")[valid], LOGIT_TOL.get(family, DEFAULT_LOGIT_TOL))
    outs = {}
    for kind, kwargs in (
        ("greedy", {"num_beams": 1}),
        ("beam3", {"num_beams": 3}),
        ("beam3_lp0", {"num_beams": 3, "length_penalty": 0.0}),
    ):
        expected = expected_new(d / f"{kind}_sequences.npy", ids.shape[1])
        out = model.generate(vision_x, ids, mask, max_new_tokens=8, pad_token_id=EOC, **kwargs).numpy()
        np.testing.assert_array_equal(out[:, : expected.shape[1]], expected)
        outs[kind] = out
    assert (outs["greedy"] == EOC).any(), "the eos variant must stop on <|endofchunk|>"
    assert not np.array_equal(outs["beam3"], outs["beam3_lp0"])  # length_penalty matters here


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("normalize_length", [True, False])
def test_cached_scoring(family, normalize_length):
    model = model_for(family)
    vision_x, ids, mask = load_case(family, "cached_scoring")
    case = json.loads((REF / family / "cases" / "cached_scoring" / "case.json").read_text())
    names = [model.tokenizer(n, add_special_tokens=False).input_ids for n in case["class_names"]]
    assert names == case["class_name_ids"]
    got = model.score(vision_x, ids, mask, names, normalize_length=normalize_length, batch_size=2).numpy()
    kind = "mean" if normalize_length else "sum"
    for suffix in ("", "_nocache"):
        assert_close(got, np.load(REF / family / "cases" / "cached_scoring" / f"loglik_{kind}{suffix}.npy"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["interleaved_leftpad"])
def test_media_index_matches_reference(family, name):
    case = json.loads((REF / family / "cases" / name / "case.json").read_text())
    _, ids, _ = load_case(family, name)
    assert media_index_v2(ids, 501).tolist() == case["media_index_per_token_v2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_does_not_depend_on_the_process_rng(family):
    vision_x, ids, mask = load_case(family, "vqa_fewshot")
    logits = []
    for seed in (0, 123):
        torch.manual_seed(seed)
        with torch.no_grad():
            logits.append(build_model(v2_config(family)).eval()(vision_x, ids, mask).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_wrappers_and_bool_buffers_accepted(family, tmp_path):
    model = model_for(family)
    state = read_checkpoint(REF / family / "checkpoint.pt")
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.lang_encoder.gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    torch.save({"model_state_dict": wrapped}, tmp_path / "wrapped.pt")
    names = load_openflamingo_checkpoint(model, tmp_path / "wrapped.pt")
    assert len(names) == len(state)
    head = "lang_encoder.lm_head.weight" if family == "gptneox" else "lang_encoder.transformer.wte.weight"
    assert head in names
    assert torch.equal(
        model.lang_encoder.get_output_embeddings().weight,
        state["lang_encoder.embed_out.weight" if family == "gptneox" else "lang_encoder.transformer.wte.weight"],
    )


@pytest.mark.parametrize(
    "family,key,renamed",
    [
        (
            "mpt",
            "lang_encoder.transformer.blocks.2.gated_cross_attn_layer.ff.1.weight",
            "lang_encoder.transformer.blocks.2.gated_cross_attn_layer.ff.2.weight",
        ),
        ("gptneox", "lang_encoder.embed_out.weight", "lang_encoder.embed_output.weight"),
    ],
)
def test_renamed_key_is_refused_naming_it(family, key, renamed, tmp_path):
    model = build_model(v2_config(family, pretrained_checkpoint_path=None))
    state = read_checkpoint(REF / family / "checkpoint.pt")
    state[renamed] = state.pop(key)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=rf"missing 1 expected.*{'.*'.join(renamed.split('.')[-2:])}") as err:
        load_openflamingo_checkpoint(model, tmp_path / "ckpt.pt")
    assert renamed in str(err.value) and "match no parameter" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_shape_is_refused_naming_it(family, tmp_path):
    model = build_model(v2_config(family, pretrained_checkpoint_path=None))
    state = read_checkpoint(REF / family / "checkpoint.pt")
    state["perceiver.layers.1.0.to_kv.weight"] = torch.zeros(1024, 48)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"perceiver\.layers\.1\.0\.to_kv\.weight: checkpoint \(1024, 48\)"):
        load_openflamingo_checkpoint(model, tmp_path / "ckpt.pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbing_an_image_changes_logits_from_the_reference_position(family):
    model = model_for(family)
    case = json.loads((REF / family / "cases" / "interleaved_leftpad" / "case.json").read_text())
    expected = case["first_valid_position_whose_logits_change_when_image_t_of_row_b_is_perturbed"]
    vision_x, ids, mask = load_case(family, "interleaved_leftpad")
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

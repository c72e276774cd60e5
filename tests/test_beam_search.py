"""Our beam search gives exactly the tokens of HF's ``generate`` on the real tiny OpenFlamingo of every LM family.

The logit of ``<|endofchunk|>`` (the eos) is made to compete with the best token, so that hypotheses end
at many lengths: the finished-hypothesis bookkeeping, the length penalty and the early-stopping rules
are what decide the outputs, not only the last step. Prompts are left padded.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lavis.models import build_model
from lavis.models.flamingo import generation as network
from lavis.models.flamingo.beam_search import BeamSettings
from lavis.models.flamingo.language_models import family_of_model
from lavis.models.flamingo.language_models.llama import RotaryTable
from tests.test_flamingo_network import PROMPTS, open_gates, prompts_batch, tiny_cfg

torch.set_num_threads(1)

SETTINGS = [
    {"num_beams": 3, "max_new_tokens": 12, "length_penalty": -2.0},  # the captioning eval's
    {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 3, "length_penalty": 1.0},
    {"num_beams": 4, "max_new_tokens": 10, "length_penalty": 0.0, "early_stopping": True, "num_return_sequences": 2},
    {"num_beams": 2, "max_new_tokens": 6, "length_penalty": 2.0, "early_stopping": "never"},
]


def family_model(family: str, semantics: str):
    tiny = {**tiny_cfg()["tiny"], "lm_family": family}
    model = build_model(tiny_cfg(xattn_semantics=semantics, tiny=tiny)).eval()
    open_gates(model, 1.5)
    return model


def hf_generate(model, *batch, **settings) -> torch.Tensor:
    """The same call through HF's own generate (our search switched off)."""
    ours = network.beam_settings
    network.beam_settings = lambda config, lm_config: None
    try:
        return model.generate(*batch, **settings)
    finally:
        network.beam_settings = ours


@pytest.mark.parametrize(
    "family, semantics", [("llama", "v1"), ("llama", "v2"), ("mpt", "v2"), ("gpt_neox", "v2"), ("mosaic_gpt", "v2")]
)
def test_beam_search_gives_hf_tokens_with_hypotheses_ending_at_every_length(family, semantics):
    model = family_model(family, semantics)
    eos = model.eoc_token_id
    batch = prompts_batch(model, PROMPTS)
    lengths, compared = set(), 0
    for trial in range(4):
        # The eos logit competes with the best token: max + a wave of the hidden state, so hypotheses end
        # at varied lengths (the same LM for both searches).
        def compete(module, args, logits, trial=trial):
            wave = torch.sin(args[0][..., :8].sum(-1) * (3.0 + trial)) - 0.5
            competing = logits.amax(-1, keepdim=True) + wave[..., None]
            return torch.cat((logits[..., :eos], competing, logits[..., eos + 1 :]), -1)

        hook = model.lang_encoder.get_output_embeddings().register_forward_hook(compete)
        for settings in SETTINGS + [{"num_beams": 3, "max_new_tokens": 9, "eos_token_id": [eos, 11 + trial]}]:
            with torch.no_grad():
                ours, theirs = model.generate(*batch, **settings), hf_generate(model, *batch, **settings)
            assert ours.shape == theirs.shape and torch.equal(ours, theirs), (trial, settings)
            ends = torch.isin(theirs, torch.tensor(settings.get("eos_token_id", eos)))
            lengths.update((ends.int().argmax(-1)[ends.any(-1)] + 1).tolist())
            compared += 1
        hook.remove()
    # Not vacuous: hypotheses ended early, at several lengths.
    assert compared == 4 * (len(SETTINGS) + 1) and len(lengths) >= 3, lengths


def test_settings_it_does_not_implement_go_to_hf(monkeypatch):
    def config(**kw):
        return GenerationConfig(**{"num_beams": 3, "max_new_tokens": 5, "eos_token_id": 8, "pad_token_id": 7, **kw})

    assert BeamSettings.of(config(), None) == BeamSettings(3, 5, 0, 1.0, False, 1, (8,), 7)
    assert BeamSettings.of(config(pad_token_id=0), None).fill_token_id == 8  # HF's `pad or eos[0]`
    for unsupported in (
        {"num_beams": 1},
        {"do_sample": True},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"use_cache": False},
        {"output_scores": True, "return_dict_in_generate": True},
    ):
        assert BeamSettings.of(config(**unsupported), None) is None, unsupported
    # An LM generation config with its own decoding defaults (HF merges them into ours) goes to HF too.
    assert BeamSettings.of(config(), GenerationConfig(repetition_penalty=1.2)) is None
    assert BeamSettings.of(config(), GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)) is not None

    model = family_model("llama", "v1")
    batch = prompts_batch(model, PROMPTS)

    def refuse(*args, **kwargs):
        raise AssertionError("HF generate was called")

    with monkeypatch.context() as m:
        m.setattr(model.lang_encoder, "generate", refuse)
        model.generate(*batch, num_beams=3, max_new_tokens=4)  # the eval settings run our search
    model.lang_encoder.generation_config.repetition_penalty = 1.3
    calls = []
    hf = model.lang_encoder.generate
    monkeypatch.setattr(model.lang_encoder, "generate", lambda *a, **kw: calls.append(1) or hf(*a, **kw))
    model.generate(*batch, num_beams=3, max_new_tokens=4)
    assert calls == [1]


@pytest.mark.parametrize("rope_type", ["default", "dynamic"])
@pytest.mark.parametrize("padded", [True, False])
def test_llama_decoding_step_is_the_forward(padded, rope_type):
    """LLaMA's direct decoding step gives the forward's logits bit for bit (with and without padding), with
    its table of rotary cos/sin (a static rotary type) or HF's rotary call (a dynamic one)."""
    lm = family_model("llama", "v1").lang_encoder
    if rope_type != "default":
        rope = {**lm.config.rope_parameters, "rope_type": rope_type, "factor": 2.0}
        lm.config.rope_parameters = rope
        lm.model.rotary_emb = LlamaRotaryEmbedding(lm.config)
    assert RotaryTable.applies(lm.model.rotary_emb) == (rope_type == "default")
    step = family_of_model(lm).decoding_step(lm, 8)
    assert step is not None
    ids = torch.randint(3, lm.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 8, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
        mask[3, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    for fast in (False, True):
        cache = network.reserved_cache(lm.config, 8)
        with torch.no_grad():
            lm(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6], cache=cache)
            args = (ids[:, 6:], mask[:, :7], positions[:, 6:7], cache)
            if fast:
                logits.append(step(*args))
            else:
                out = lm(input_ids=args[0], attention_mask=args[1], position_ids=args[2], cache=cache, logits_to_keep=1)
                logits.append(out.logits[:, -1])
    assert torch.equal(logits[0], logits[1])


def test_decoding_step_is_offered_only_where_it_is_the_forward():
    lm = family_model("llama", "v1").lang_encoder
    lm.set_attn_implementation("eager")  # create_causal_mask builds another mask for eager attention
    assert family_of_model(lm).decoding_step(lm, 8) is None
    for family in ("mpt", "gpt_neox", "mosaic_gpt"):
        other = family_model(family, "v2").lang_encoder
        assert family_of_model(other).decoding_step(other, 8) is None

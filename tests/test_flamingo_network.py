"""Behaviour of the Flamingo network on the tiny model: masks, gates, caching, state dicts, configs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lavis.common.config import read_yaml
from lavis.common.errors import CheckpointError, ConfigError, DataError
from lavis.models import build_model
from lavis.models.flamingo.cross_attention import media_index_v1, media_index_v2
from lavis.models.flamingo.flamingo import Flamingo
from lavis.models.flamingo.generation import pad_after_eos
from lavis.models.flamingo.openflamingo import OpenFlamingo
from lavis.models.flamingo.vision import build_vision_tower

torch.set_num_threads(1)
TINY_YAML = "lavis/configs/models/openflamingo/tiny.yaml"
WORDS = (
    "a an the this that there is are of on in at to and with image picture photo shape shapes circle square "
    "triangle red green blue yellow purple orange one two three four 1 2 3 4 left right top bottom middle "
    "center upper lower side what which how many color colour yes no question answer short output"
).split()


def tiny_cfg(**overrides) -> dict:
    cfg = dict(read_yaml(TINY_YAML).model)
    cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in cfg.items()}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tiny():
    return build_model(tiny_cfg()).eval()


def open_gates(model, value=1.0):
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def prompts_batch(model, prompts):
    tok = model.tokenizer
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding="longest")
    g = torch.Generator().manual_seed(1)
    vision_x = torch.randn(len(prompts), 3, 1, 3, model.image_size, model.image_size, generator=g)
    return vision_x, batch.input_ids, batch.attention_mask


PROMPTS = [
    "a circle<image>question: what color is the shape? answer: red<|endofchunk|><image>question: how many",
    "<image>output: a red circle.<|endofchunk|><image>output:",
    "<image>this photo shows",
]


# ---------------------------------------------------------------- media masks
M, E, P, S, T = 9, 8, 7, 1, 5  # <image>, <|endofchunk|>, <PAD>, <s>, text
CRAFTED = torch.tensor(
    [
        [S, T, M, T, T, E, M, T, E, M, T, T],  # text before the first image, three images
        [P, P, P, P, S, M, T, E, M, T, T, T],  # left padding, two images
    ]
)


def test_v1_media_index_table():
    # Hand-written: before the first image -> 1; <image> k -> k; text after image k -> k+1; after the last -> 0.
    assert media_index_v1(CRAFTED, M).tolist() == [
        [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 0, 0],
        [1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0],
    ]


def test_v2_media_index_table():
    # Hand-written: most recent <image> at or before the token; nothing before the first one.
    assert media_index_v2(CRAFTED, M).tolist() == [
        [0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3],
        [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2],
    ]
    # A cached decoding step continues the count: a new text token attends the last image.
    assert media_index_v2(torch.tensor([[T], [T]]), M, torch.tensor([3, 2])).tolist() == [[3], [2]]
    assert media_index_v1(torch.tensor([[T], [T]]), M).tolist() == [[0], [0]]
    # One token per row (the shortcut of cached decoding steps): an <image> attends its own image, text none.
    one = torch.tensor([[M], [T]])
    assert media_index_v1(one, M).tolist() == [[1], [0]]
    assert media_index_v1(one, M).dtype == media_index_v1(CRAFTED, M).dtype


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_cross_attention_uses_only_the_indexed_image(tiny, semantics):
    tiny.xattn_semantics = semantics
    open_gates(tiny)
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS[:1])
    index = (media_index_v1 if semantics == "v1" else media_index_v2)(ids, tiny.media_token_id)[0]
    with torch.no_grad():
        base = tiny(vision_x, ids, mask).logits[0]
        for t in range(2):
            perturbed = vision_x.clone()
            perturbed[0, t] += 1.0
            changed = (tiny(perturbed, ids, mask).logits[0] - base).abs().amax(-1) > 1e-6
            # Causal LM: the first changed position is the first token that attends image t+1.
            assert int(changed.nonzero()[0]) == int((index == t + 1).nonzero()[0])
        unused = vision_x.clone()
        unused[0, 2] += 1.0  # the prompt has two <image> tokens: the third image is never attended
        assert torch.equal(tiny(unused, ids, mask).logits[0], base)
    open_gates(tiny, 0.0)


# ---------------------------------------------------------------- gates, forward, loss
def test_fresh_model_equals_bare_language_model(tiny):
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS)
    with torch.no_grad():
        flamingo = tiny(vision_x, ids, mask).logits
        bare = tiny.lang_encoder(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(flamingo[mask.bool()], bare[mask.bool()])
    open_gates(tiny)
    with torch.no_grad():
        opened = tiny(vision_x, ids, mask).logits
    open_gates(tiny, 0.0)
    assert (opened - flamingo)[mask.bool()].abs().max() > 1e-3


def test_loss_and_gradients_reach_trainable_parts(tiny):
    tiny.train()
    open_gates(tiny, 0.5)
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS)
    labels = ids.masked_fill(mask == 0, -100)
    out = tiny(vision_x, ids, mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert tiny.perceiver.latents.grad is not None and tiny.perceiver.latents.grad.abs().sum() > 0
    assert tiny.gated_cross_attn_layers["0"].attn.to_kv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.vision_encoder.parameters())
    tiny.zero_grad(set_to_none=True)
    tiny.eval()
    open_gates(tiny, 0.0)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build_model(tiny_cfg(gradient_checkpointing=checkpointing)).train()
        open_gates(model, 0.5)
        vision_x, ids, mask = prompts_batch(model, PROMPTS)
        model(vision_x, ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append(model.gated_cross_attn_layers["1"].ff[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_too_many_image_tokens_is_a_data_error(tiny):
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS)
    with pytest.raises(DataError, match="row 0 of lang_x has 2 <image> tokens but vision_x holds only 1"):
        tiny(vision_x[:, :1], ids, mask)


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("semantics", ["v1", "v2"])
@pytest.mark.parametrize("kwargs", [{"num_beams": 1}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}])
def test_cached_and_uncached_generation_agree(tiny, semantics, kwargs):
    tiny.xattn_semantics = semantics
    open_gates(tiny, 1.5)
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS)
    cached = tiny.generate(vision_x, ids, mask, max_new_tokens=6, min_new_tokens=2, **kwargs)
    uncached = tiny.generate(vision_x, ids, mask, max_new_tokens=6, min_new_tokens=2, use_cache=False, **kwargs)
    open_gates(tiny, 0.0)
    assert cached.shape == (len(PROMPTS) * kwargs.get("num_return_sequences", 1), 6)
    assert torch.equal(cached, uncached)


def test_generation_returns_new_tokens_of_a_manual_greedy_loop(tiny):
    tiny.xattn_semantics = "v2"
    open_gates(tiny, 1.5)
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS)
    new = tiny.generate(vision_x, ids, mask, max_new_tokens=5, eos_token_id=None)
    seq, am = ids, mask
    with torch.no_grad():
        for _ in range(5):  # re-encode everything each step, no cache
            nxt = tiny(vision_x, seq, am).logits[:, -1].argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    open_gates(tiny, 0.0)
    assert torch.equal(new, seq[:, ids.shape[1] :])


def test_pad_after_eos():
    tokens = torch.tensor([[5, 9, 9, 9], [5, 6, 7, 8], [9, 1, 9, 2]])
    assert pad_after_eos(tokens, 9, 0).tolist() == [[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]


# ---------------------------------------------------------------- state dicts
def test_trainable_state_dict_round_trip(tiny):
    state = tiny.trainable_state_dict()
    assert state and all(
        k.startswith(("perceiver.", "gated_cross_attn_layers.", "lang_encoder.model.embed_tokens")) for k in state
    )
    assert not any(k.startswith("vision_encoder") or ".layers.0.self_attn" in k for k in state)
    other = build_model(tiny_cfg(tiny={**tiny_cfg()["tiny"], "seed": 0})).eval()
    with torch.no_grad():
        for p in other.perceiver.parameters():
            p.add_(1.0)
        for block in other.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.7)
    vision_x, ids, mask = prompts_batch(tiny, PROMPTS)
    with torch.no_grad():
        assert not torch.equal(other(vision_x, ids, mask).logits, tiny(vision_x, ids, mask).logits)
        other.load_trainable_state_dict(state)
        assert torch.equal(other(vision_x, ids, mask).logits, tiny(vision_x, ids, mask).logits)


def test_trainable_state_dict_is_the_models_packages_one_implementation(tiny):
    from lavis.models import adapters

    state = tiny.trainable_state_dict()
    assert list(state) == list(adapters.trainable_state_dict(torch.nn.DataParallel(tiny)))
    # No copy on the model's device: the checkpoint writer copies to the CPU itself.
    assert state["perceiver.latents"].data_ptr() == tiny.perceiver.latents.data_ptr()
    assert not state["perceiver.latents"].requires_grad


def test_load_trainable_state_dict_errors_list_names(tiny):
    state = tiny.trainable_state_dict()
    state.pop("perceiver.latents")
    state["perceiver.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing 1 .*perceiver\.latents.*unexpected 1 .*perceiver\.extra"):
        tiny.load_trainable_state_dict(state)
    state = tiny.trainable_state_dict()
    state["perceiver.latents"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"perceiver\.latents: checkpoint \(3, 3\) vs model"):
        tiny.load_trainable_state_dict(state)


# ---------------------------------------------------------------- builder / config
def test_build_is_deterministic_and_has_the_contract_attributes(tiny):
    again = build_model(tiny_cfg()).eval()
    assert torch.equal(again.perceiver.latents, tiny.perceiver.latents)
    assert again.image_size == 64 and callable(again.image_processor)
    assert isinstance(again, OpenFlamingo) and again.lang_encoder.model.layers[0].self_attn.q_proj is not None
    assert set(again.gated_cross_attn_layers) == {"0", "1"}


def test_defaults_fill_omitted_keys():
    model = build_model(
        {
            "arch": "openflamingo",
            "clip_vision_encoder_path": "tiny",
            "lang_encoder_path": "tiny",
            "tokenizer_path": "tiny",
            "cross_attn_every_n_layers": 2,
        }
    )
    assert set(model.gated_cross_attn_layers) == {"1"}  # before every 2nd layer of the 2-layer tiny LM
    assert model.xattn_semantics == "v2" and len(model.perceiver.layers) == 6


def test_missing_paths_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_PATH", raising=False)
    with pytest.raises(ConfigError, match=r"model\.tokenizer_path is not set.*LLAMA_PATH"):
        build_model(tiny_cfg(tokenizer_path=None))
    with pytest.raises(ConfigError, match=r"model\.lang_encoder_path: language model directory .*nope.* does not"):
        build_model(tiny_cfg(lang_encoder_path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"model\.xattn_semantics"):
        build_model(tiny_cfg(xattn_semantics="v3"))
    with pytest.raises(ConfigError, match=r"quantization"):
        build_model(tiny_cfg(quantization="8bit"))


def test_tiny_tokenizer_covers_the_shapes_vocabulary(tiny):
    tok = tiny.tokenizer
    for word in WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("<image>question: what colour?<|endofchunk|>").input_ids
    assert ids[0] == tok.bos_token_id and ids[1] == tiny.media_token_id and ids[-1] == tiny.eoc_token_id
    text = "zébra 42"  # unseen word and non-ASCII: byte fallback, lossless
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.pad_token == "<PAD>"


def test_openflamingo_9b_parameter_count_on_meta_device():
    lm_config = LlamaConfig(
        vocab_size=32003,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
    )
    with torch.device("meta"):
        vision = build_vision_tower("ViT-L-14", None)
        lm = LlamaForCausalLM(lm_config)
        model = Flamingo(
            vision.visual,
            lm,
            vis_dim=vision.vis_dim,
            media_token_id=32001,
            eoc_token_id=32000,
            pad_token_id=32002,
            cross_attn_every_n_layers=4,
        )
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert vision.vis_dim == 1024 and vision.image_size == 224
    assert count(model.perceiver) == 63_019_008
    assert sorted(map(int, model.gated_cross_attn_layers)) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert all(count(b) == 139_476_994 for b in model.gated_cross_attn_layers.values())
    total = count(model.perceiver) + count(model.gated_cross_attn_layers) + lm.get_input_embeddings().weight.numel()
    assert total == 1_309_919_248

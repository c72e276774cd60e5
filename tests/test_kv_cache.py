"""The KV caches of generation: reserved per call (lavis.models.flamingo.kv_cache) and shared by the beams of
a sample (lavis.models.flamingo.shared_prompt).

Checked against what they replace: HF's ``index_select`` reorder; the prompt repeated per beam row
(``ReservedLayer.batch_repeat_interleave``) and plain SDPA over it; and, on the tiny OpenFlamingo, HF
generation with its own ``DynamicCache`` and the uncached generation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lavis.models import build_model
from lavis.models.flamingo import generation
from lavis.models.flamingo.kv_cache import ReservedLayer
from lavis.models.flamingo.shared_prompt import SharedPrompt, SharedPromptLayer, shared_prompt_sdpa
from tests.test_flamingo_network import PROMPTS, open_gates, prompts_batch, tiny_cfg

torch.set_num_threads(1)
SAMPLES, BEAMS, HEADS, PROMPT, DIM = 2, 3, 2, 4, 8


def filled_pair(capacity: int):
    """A repeated layer and a shared one holding the same prompt (2 samples x 3 beams), sample 0 left-padded."""
    torch.manual_seed(0)
    k, v = torch.randn(SAMPLES, HEADS, PROMPT, DIM), torch.randn(SAMPLES, HEADS, PROMPT, DIM)
    repeated, base = ReservedLayer(capacity), ReservedLayer(capacity)
    repeated.update(k, v)
    repeated.batch_repeat_interleave(BEAMS)
    base.update(k, v)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    return repeated, SharedPromptLayer(base, BEAMS), SharedPrompt(prompt_mask, BEAMS), prompt_mask


@pytest.mark.parametrize("capacity", [PROMPT + 8, 1])  # 1: the buffers must grow past the reservation
def test_each_beam_attends_what_it_attends_with_the_prompt_repeated_per_beam(capacity):
    """Steps of beam search (reorders within samples, one token per beam row): the folded attention over
    the shared layer equals plain SDPA over the repeated, reordered layer with the padding mask."""
    repeated, shared, prompt, prompt_mask = filled_pair(capacity)
    orders = [torch.tensor([1, 1, 0, 5, 3, 3]), torch.arange(6), torch.tensor([2, 0, 1, 4, 4, 4])]
    for step in range(5):
        if step:
            order = orders[step % len(orders)]
            repeated.reorder_cache(order)
            prompt.reorder(order)
        mask = prompt.next_mask()
        k, v = torch.randn(SAMPLES * BEAMS, HEADS, 1, DIM), torch.randn(SAMPLES * BEAMS, HEADS, 1, DIM)
        repeated.update(k, v)
        keys, values = shared.update(k, v)
        assert shared.get_seq_length() == repeated.get_seq_length() == PROMPT + step + 1
        query = torch.randn(SAMPLES * BEAMS, HEADS, 1, DIM)
        out, _ = shared_prompt_sdpa(None, query, keys, values, mask, scaling=DIM**-0.5)
        row_mask = torch.cat((prompt_mask, torch.ones(SAMPLES, step + 1, dtype=torch.long)), 1).bool()
        row_mask = row_mask.repeat_interleave(BEAMS, dim=0)[:, None, None, :]
        expected = F.scaled_dot_product_attention(query, repeated.keys, repeated.values, attn_mask=row_mask)
        torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    # The prompt is stored once per sample: B rows, not B x beams; nothing was moved by the reorders.
    assert shared.keys.shape[0] == SAMPLES and shared.keys.shape[2] == PROMPT + 5 * BEAMS


def test_shared_prompt_refuses_what_it_cannot_represent():
    _, shared, prompt, _ = filled_pair(PROMPT + 4)
    prompt.next_mask()
    shared.update(torch.randn(6, HEADS, 1, DIM), torch.randn(6, HEADS, 1, DIM))
    with pytest.raises(ValueError, match="within their sample"):
        prompt.reorder(torch.tensor([3, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="ancestries"):
        shared.reorder_cache(torch.tensor([1, 1, 0, 5, 3, 3]))
    with pytest.raises(ValueError, match="one token per beam row"):
        shared.update(torch.randn(6, HEADS, 2, DIM), torch.randn(6, HEADS, 2, DIM))
    with pytest.raises(ValueError, match="already serves"):
        shared.batch_repeat_interleave(2)
    query = torch.randn(6, HEADS, 1, DIM)
    with pytest.raises(ValueError, match="needs its SharedPrompt mask"):
        shared_prompt_sdpa(None, query, shared.keys, shared.values, None)  # would mix the beams


@pytest.mark.parametrize(("kv_heads", "shares"), [(4, True), (2, False)])
def test_share_prompt_declines_grouped_query_attention_and_leaves_the_cache_as_it_was(kv_heads, shares):
    from transformers import LlamaConfig

    from lavis.models.flamingo.kv_cache import reserved_cache
    from lavis.models.flamingo.shared_prompt import share_prompt

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads, num_hidden_layers=2)
    cache = reserved_cache(config, 8)
    for layer in cache.layers:
        layer.update(torch.randn(SAMPLES, kv_heads, PROMPT, DIM), torch.randn(SAMPLES, kv_heads, PROMPT, DIM))
    before = list(cache.layers)
    shared = share_prompt(cache, BEAMS, torch.ones(SAMPLES, PROMPT, dtype=torch.long), config)
    assert (shared is not None) == shares
    assert all(isinstance(layer, SharedPromptLayer) for layer in cache.layers) == shares
    if not shares:
        assert cache.layers == before


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_beam_search_on_the_tiny_openflamingo_shares_the_prompt_and_generates_hf_tokens(monkeypatch, semantics):
    model = build_model(tiny_cfg(xattn_semantics=semantics)).eval()
    open_gates(model, 1.5)
    vision_x, ids, mask = prompts_batch(model, PROMPTS)
    settings = {"num_beams": 3, "max_new_tokens": 10, "min_new_tokens": 3, "length_penalty": -1.0}
    shared_rows = []
    share = generation.share_prompt

    def recording(cache, beams, prompt_mask, config):
        shared = share(cache, beams, prompt_mask, config)
        shared_rows.extend(layer.keys.shape[0] for layer in cache.layers)
        return shared

    monkeypatch.setattr(generation, "share_prompt", recording)
    ours = model.generate(vision_x, ids, mask, **settings)
    assert shared_rows == [len(PROMPTS)] * model.lang_encoder.config.num_hidden_layers
    assert model.lang_encoder.config._attn_implementation == "sdpa"  # restored after the search
    monkeypatch.setattr(generation, "reserved_cache", lambda config, _: DynamicCache(config=config))
    monkeypatch.setattr(generation, "beam_settings", lambda config, lm_config: None)  # HF's own generate
    assert torch.equal(ours, model.generate(vision_x, ids, mask, **settings))


@pytest.mark.parametrize(("hf_search", "boost"), [(False, 1.02), (True, 1.5)])
def test_v2_beams_that_generate_an_image_token_keep_their_own_image_count(hf_search, boost):
    """Under v2 a generated <image> moves a row's media index on; after a beam reorder each row must carry
    the count of the row it continues. With <image> about as likely as the top token, beams that try it
    and beams that do not trade places, and the cached generation must still equal the uncached one
    (which recounts from the whole sequence at every step). ``hf_search``: a repetition penalty sends
    the search to HF's beam search, which reorders through the cache (and penalises the prompt's <image>,
    hence the larger ``boost``). Both cases fail without the count following the beams."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(xattn_semantics="v2")).eval()
    open_gates(model, 1.5)
    vision_x, ids, mask = prompts_batch(model, PROMPTS)
    settings = {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 8}
    if hf_search:
        settings["repetition_penalty"] = 1.1
    head = model.lang_encoder.get_output_embeddings().weight
    with torch.no_grad():
        top = model.generate(vision_x, ids, mask, **settings)[0, 0]
        head[model.media_token_id] = head[top] * boost
    fed = []  # the tokens of every decoding call: some beam must have been fed <image>
    embed = model.lang_encoder.get_input_embeddings()
    hook = embed.register_forward_pre_hook(lambda m, args: fed.append(args[0]) if args[0].shape[1] == 1 else None)
    cached = model.generate(vision_x, ids, mask, **settings)
    hook.remove()
    assert any((tokens == model.media_token_id).any() for tokens in fed)  # the case is exercised
    assert torch.equal(cached, model.generate(vision_x, ids, mask, use_cache=False, **settings))


def test_reserved_layer_reorders_beams_like_index_select():
    from lavis.models.flamingo.kv_cache import ReservedLayer

    torch.manual_seed(0)
    layer = ReservedLayer(capacity=3)
    k, v = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 5, 3)
    layer.update(k[:, :, :2], v[:, :, :2])
    layer.update(k[:, :, 2:], v[:, :, 2:])  # past the capacity: the buffers grow
    order = torch.tensor([2, 2, 0, 1])
    layer.reorder_cache(order)
    assert torch.equal(layer.keys, k[order]) and torch.equal(layer.values, v[order])
    before = layer.keys.data_ptr()
    layer.reorder_cache(torch.arange(4))  # every beam continues itself: nothing moves
    assert layer.keys.data_ptr() == before and torch.equal(layer.keys, k[order])
    layer.update(k[:, :, :1], v[:, :, :1])
    assert layer.get_seq_length() == 6 and torch.equal(layer.keys[:, :, 5], k[:, :, 0])


def test_reserved_layer_after_repeat_moves_only_the_generated_positions_and_stays_exact():
    from lavis.models.flamingo.kv_cache import ReservedLayer

    torch.manual_seed(0)
    layer = ReservedLayer(capacity=8)
    prefix_k, prefix_v = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 3)
    layer.update(prefix_k, prefix_v)
    layer.batch_repeat_interleave(3)  # 2 samples x 3 beams
    k = torch.cat((prefix_k.repeat_interleave(3, dim=0), torch.randn(6, 2, 2, 3)), dim=2)
    v = torch.cat((prefix_v.repeat_interleave(3, dim=0), torch.randn(6, 2, 2, 3)), dim=2)
    layer.update(k[:, :, 4:], v[:, :, 4:])
    within = torch.tensor([1, 1, 0, 5, 3, 3])  # each sample's beams permuted among themselves
    layer.reorder_cache(within)
    assert torch.equal(layer.keys, k[within]) and torch.equal(layer.values, v[within])
    across = torch.tensor([3, 0, 0, 5, 1, 2])  # not something beam search does: the full gather handles it
    layer.reorder_cache(across)
    assert torch.equal(layer.keys, k[within][across]) and torch.equal(layer.values, v[within][across])

"""The fused attention paths equal the plain formulas of the release, and do only the work that changes.

The references are the release's masked attention written out term by term (dense similarity over every
image's latents, masked_fill, amax subtraction, softmax, rows without an image zeroed;
``benchmarks/release_formulas.py``, the few-shot benchmark's baseline too), run on the media repeated per
beam: what OpenFlamingo computes at every LM call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lavis.common.config import read_yaml
from lavis.models import build_model
from lavis.models.flamingo.cross_attention import MaskedCrossAttention, media_index_v1, media_index_v2
from lavis.models.flamingo.perceiver import PerceiverAttention
from tests.test_flamingo_network import PROMPTS, open_gates, prompts_batch, tiny_cfg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from release_formulas import release_cross_attention, release_perceiver_attention  # noqa: E402

torch.set_num_threads(1)


M = 9  # the media token id of these crafted rows


@pytest.mark.parametrize("semantics", ["v1", "v2"])
@pytest.mark.parametrize("group", [1, 3])
def test_cross_attention_equals_the_release_formula(semantics, group):
    torch.manual_seed(0)
    attn = MaskedCrossAttention(32, 16, dim_head=8, heads=4)
    ids = torch.tensor([[1, 5, M, 5, 5, M, 5, 5, 5], [0, 0, 1, M, 5, 5, M, 5, 5], [0, 0, 0, 0, 1, M, 5, 5, 5]])
    index = media_index_v1(ids, M) if semantics == "v1" else media_index_v2(ids, M)
    media = torch.randn(3, 2, 5, 16)
    x = torch.randn(3 * group, ids.shape[1], 32)
    index = index.repeat_interleave(group, dim=0)
    with torch.no_grad():
        fast = attn(x, media, index)  # media rows shared by the group, not repeated
        slow = release_cross_attention(attn, x, media.repeat_interleave(group, dim=0), index)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[index == 0], torch.zeros_like(fast[index == 0]))


@pytest.mark.parametrize("semantics", ["v1", "v2"])
@pytest.mark.parametrize("group", [1, 3])
def test_per_image_segments_give_the_release_outputs_and_gradients(semantics, group):
    """Prompts with several images take the per-image segment path: outputs and gradients are the dense
    release formula's, with rows of other lengths, left padding and an index past the images given."""
    torch.manual_seed(0)
    attn = MaskedCrossAttention(32, 16, dim_head=8, heads=4)
    ids = torch.tensor(
        [
            [M, 5, 5, 5, M, 5, M, 5, 5, 5, 5, M, 5],
            [0, 0, 0, 1, M, 5, 5, M, 5, 5, 5, 5, 5],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, M, 5, M, 5],
        ]
    )
    index = media_index_v1(ids, M) if semantics == "v1" else media_index_v2(ids, M)
    index[0, -1] = 7  # past the 4 images given: attends nothing
    index = index.repeat_interleave(group, dim=0)
    media = torch.randn(3, 4, 5, 16)
    x = torch.randn(3 * group, ids.shape[1], 32, requires_grad=True)
    fast = attn(x, media, index)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *attn.parameters()])
    slow = release_cross_attention(attn, x, media.repeat_interleave(group, dim=0), index)
    grads_slow = torch.autograd.grad(slow.square().sum(), [x, *attn.parameters()])
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    attending = (index > 0) & (index <= 4)
    assert torch.equal(fast[~attending], torch.zeros_like(fast[~attending]))


def test_a_call_where_no_token_attends_an_image_does_no_attention():
    attn = MaskedCrossAttention(32, 16, dim_head=8, heads=4)
    calls = []
    attn.to_q.register_forward_hook(lambda *a: calls.append(1))
    assert attn(torch.randn(6, 1, 32), torch.randn(2, 2, 5, 16), torch.zeros(6, 1, dtype=torch.long)) is None
    assert not calls


@pytest.mark.parametrize("shared", [False, True])
def test_perceiver_attention_equals_the_release_formula(shared):
    """Per-image latents, and the first layer's shared ones (queries and keys/values computed once, not per
    image): the release's outputs, and its gradients."""
    torch.manual_seed(0)
    attn = PerceiverAttention(32, dim_head=8, heads=4)
    media = torch.randn(2, 3, 10, 32)
    latents = torch.randn(4, 32) if shared else torch.randn(2, 3, 4, 32)
    latents.requires_grad_(True)
    fast = attn(media, latents)
    grads_fast = torch.autograd.grad(fast.square().sum(), [latents, *attn.parameters()])
    slow = release_perceiver_attention(attn, media, latents)
    grads_slow = torch.autograd.grad(slow.square().sum(), [latents, *attn.parameters()])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_media_keys_values_computed_once_per_generate_on_the_media_rows(semantics):
    model = build_model(tiny_cfg(xattn_semantics=semantics)).eval()
    open_gates(model, 1.5)
    vision_x, ids, mask = prompts_batch(model, PROMPTS)
    rows = []
    handles = [
        block.attn.to_kv.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
        for block in model.gated_cross_attn_layers.values()
    ]
    model.generate(vision_x, ids, mask, num_beams=3, max_new_tokens=6, min_new_tokens=6)
    for h in handles:
        h.remove()
    # One to_kv call per block for the whole generation, on the 3 media rows (not 3 x 3 beam rows).
    assert rows == [len(PROMPTS)] * len(model.gated_cross_attn_layers)


def test_generation_logits_match_the_release_formula_path():
    """Whole-model logits with the fused blocks equal those with the release's formulas (1e-5)."""
    model = build_model(tiny_cfg(xattn_semantics="v1")).eval()
    open_gates(model, 1.0)
    vision_x, ids, mask = prompts_batch(model, PROMPTS)
    with torch.no_grad():
        fast = model(vision_x, ids, mask).logits
        originals = {}
        for block in model.gated_cross_attn_layers.values():
            originals[block] = block.attn.forward
            block.attn.forward = (
                lambda a: lambda x, kv, index: release_cross_attention(a, x, model._cond.media, index)
            )(block.attn)
        for attn, _ in model.perceiver.layers:
            attn.forward = (lambda a: lambda m, lat: release_perceiver_attention(a, m, lat))(attn)
        slow = model(vision_x, ids, mask).logits
    open_gates(model, 0.0)
    valid = mask.bool()
    torch.testing.assert_close(fast[valid], slow[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_prompt_run_once_per_sample_generates_what_the_per_beam_prompt_does(semantics):
    """Beam search over a prompt computed once per sample equals the plain (uncached) generation, also
    for prompts whose last token is an <image> (its media index comes from the whole prompt)."""
    model = build_model(tiny_cfg(xattn_semantics=semantics)).eval()
    open_gates(model, 1.5)
    prompts = [*PROMPTS, "<image>output: a red circle.<|endofchunk|><image>"]
    vision_x, ids, mask = prompts_batch(model, prompts)
    calls = []
    hook = model.lang_encoder.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    once = model.generate(vision_x, ids, mask, num_beams=3, max_new_tokens=5, min_new_tokens=5)
    hook.remove()
    plain = model.generate(vision_x, ids, mask, num_beams=3, max_new_tokens=5, min_new_tokens=5, use_cache=False)
    assert torch.equal(once, plain)
    # The whole prompt ran on the 4 samples, then every call fed one token per beam row.
    assert calls[0] == (4, ids.shape[1]) and all(shape == (12, 1) for shape in calls[1:])


@pytest.mark.parametrize("semantics", ["v1", "v2"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_reserved_kv_cache_generates_what_hf_dynamic_cache_does(monkeypatch, semantics, num_beams):
    """The cache reserved per generate call (in-place writes, beam reorder by gather into a spare buffer)
    gives the tokens of HF's concatenating DynamicCache, on the tiny OpenFlamingo with left padding."""
    from transformers import DynamicCache

    from lavis.models.flamingo import generation as network

    model = build_model(tiny_cfg(xattn_semantics=semantics)).eval()
    open_gates(model, 1.5)
    vision_x, ids, mask = prompts_batch(model, PROMPTS)
    settings = {"num_beams": num_beams, "max_new_tokens": 12, "min_new_tokens": 4, "length_penalty": -1.0}
    reserve = network.reserved_cache
    # Capacity 1: the buffers must also grow correctly when a call outlives its reservation.
    for tight in (False, True):
        if tight:
            monkeypatch.setattr(network, "reserved_cache", lambda config, _: reserve(config, 1))
        reserved = model.generate(vision_x, ids, mask, **settings)
        with monkeypatch.context() as m:
            m.setattr(network, "reserved_cache", lambda config, _: DynamicCache(config=config))
            dynamic = model.generate(vision_x, ids, mask, **settings)
        assert torch.equal(reserved, dynamic)


# ---------------------------------------------------------------- the training loss at the labelled positions
def training_batch(model):
    """Right-padded rows with text, images and targets; row 2 has no target; row 0 ends before the others."""
    texts = [
        "<image>output: a red circle.<|endofchunk|>",
        "a circle<image>question: what color is the shape? answer: red<|endofchunk|><image>output: a blue",
        "<image>this photo shows",
        "<image>output: two green squares on the left side of the image.<|endofchunk|>",
    ]
    tok = model.tokenizer
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding="longest")
    ids, mask = batch.input_ids, batch.attention_mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    labels[1, -4:] = -100  # row 1's last columns (an <image> among them) predict nothing
    labels[2] = -100  # a fully masked row
    g = torch.Generator().manual_seed(3)
    vision_x = torch.randn(len(texts), 2, 1, 3, model.image_size, model.image_size, generator=g)
    return vision_x, ids, mask, labels


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out, grads


@pytest.mark.parametrize("config", ["tiny", "tiny_mpt", "tiny_gpt_neox"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_only_path_equals_the_full_logits_loss_and_gradients(config, reduction):
    """The loss and every trainable gradient of the labelled-positions path equal HF's full-logits loss."""
    model = build_model(OmegaConf.to_container(read_yaml(f"lavis/configs/models/openflamingo/{config}.yaml").model))
    model.train()
    open_gates(model, 0.7)
    vision_x, ids, mask, labels = batch = training_batch(model)
    count = (labels[:, 1:] != -100).sum()
    assert 0 < count and int(labels[:, 1:].ne(-100).nonzero()[:, 1].max()) + 1 < ids.shape[1]  # trimmed
    kwargs = {"num_items_in_batch": count} if reduction == "sum" else {}
    full, full_grads = loss_and_grads(model, batch, **kwargs)
    fast, fast_grads = loss_and_grads(model, batch, loss_only=True, **kwargs)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == full_grads.keys() and full_grads
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) == set(full_grads)  # the embeddings, the perceiver, every block
    for name in trainable:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=0, atol=1e-6, msg=name)
    # The logits of the labelled positions, row-major, are those of the full forward there.
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    torch.testing.assert_close(fast.logits, full.logits[rows, cols], rtol=1e-5, atol=1e-5)
    assert fast.logits.shape == (int(count), full.logits.shape[-1])


def test_loss_only_path_without_targets():
    """A batch without targets: loss 0 with num_items_in_batch (as HF: sum 0 / 1), NaN as a mean; no grad."""
    model = build_model(tiny_cfg()).train()
    vision_x, ids, mask, labels = training_batch(model)
    labels = torch.full_like(labels, -100)
    out = model(vision_x, ids, mask, labels, loss_only=True, num_items_in_batch=torch.tensor(1))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.logits.shape[0] == 0
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.grad is not None)
    assert torch.isnan(model(vision_x, ids, mask, labels, loss_only=True).loss)
    assert torch.isnan(model(vision_x, ids, mask, labels).loss)


def test_train_step_asks_for_the_loss_only():
    """BaseTask.train_step runs the labelled-positions path: the output head sees only the target rows, the
    decoder only the columns up to the last position that predicts a label (packed rows)."""
    from lavis.tasks.base import BaseTask

    model = build_model(tiny_cfg()).train()
    vision_x, ids, mask, labels = training_batch(model)
    rows, calls = [], []
    model.lang_encoder.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape))
    model.lang_encoder.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    task = BaseTask.__new__(BaseTask)
    batch = {"vision_x": vision_x, "lang_x": ids, "attention_mask": mask, "labels": labels}
    summed = task.train_step(model, batch)
    count = task.loss_count(batch)
    assert rows == [(count, model.lang_encoder.config.hidden_size)]
    last = int((labels[:, 1:] != -100).nonzero()[:, 1].max())
    # The rows up to their last target, packed: as wide as the widest, fewer than the batch's rows.
    assert len(calls) == 1 and calls[0][1] == last + 1 < ids.shape[1] and calls[0][0] < ids.shape[0]
    full = model(vision_x, ids, mask, labels=labels).loss
    torch.testing.assert_close(summed / count, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_padding_images_are_not_encoded_and_change_no_loss_or_gradient(semantics):
    """Slots past a row's <image> count (rows with fewer images than the batch's widest) skip the vision
    tower and the Perceiver; loss and every gradient equal those of encoding every slot (noise images)."""
    from lavis.models.flamingo import flamingo as network

    model = build_model(tiny_cfg(xattn_semantics=semantics)).train()
    open_gates(model, 0.7)
    batch = training_batch(model)  # 2 image slots; only row 1 has 2 <image> tokens
    counts = (batch[1] == model.media_token_id).sum(-1)
    assert counts.tolist() == [1, 2, 1, 1]
    encoded = []
    hook = model.perceiver.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[:2]))
    skipped, skipped_grads = loss_and_grads(model, batch, loss_only=True)
    assert encoded == [(5, 1)]  # the 5 real images, not the 8 slots
    encoded.clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(network.Flamingo, "encode_vision", lambda self, vision_x, counts=None: self._encode_images(vision_x))
        every, every_grads = loss_and_grads(model, batch, loss_only=True)
    hook.remove()
    assert encoded == [(4, 2)]
    torch.testing.assert_close(skipped.loss, every.loss, rtol=1e-6, atol=1e-6)
    assert skipped_grads.keys() == every_grads.keys() and any("perceiver" in n for n in every_grads)
    for name, grad in every_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- packed training rows
def test_packing_places_every_kept_token_once_with_positions_restarting_per_sample():
    from lavis.models.flamingo.packing import Packing

    ids = torch.arange(1, 1 + 5 * 9).reshape(5, 9)
    widths = [9, 3, 0, 5, 4]  # row 2 has no target: dropped
    packing = Packing(ids, widths, pad_token_id=0)
    assert packing.input_ids.shape == (3, 9)  # first-fit decreasing: [9], [5, 4], [3] (not 4 padded rows)
    kept = sorted(packing.input_ids[packing.input_ids > 0].tolist())
    assert kept == sorted(int(ids[r, c]) for r, w in enumerate(widths) for c in range(w))
    assert packing.positions.tolist()[1] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packing.positions.tolist()[2] == [0, 1, 2, 0, 1, 2, 3, 4, 5]  # the free tail: its own sequence
    hidden = torch.randn(3, 9, 4)
    padded = packing.unpack(hidden)
    assert torch.equal(
        packing.repack(torch.zeros_like(hidden), padded)[packing.input_ids > 0], hidden[packing.input_ids > 0]
    )
    rows, cols = torch.tensor([3, 4]), torch.tensor([4, 0])
    assert packing.input_ids[packing.locate(rows, cols)].tolist() == [int(ids[3, 4]), int(ids[4, 0])]


@pytest.mark.parametrize(
    ("config", "semantics", "packs"),
    [("tiny", "v1", True), ("tiny", "v2", True), ("tiny_gpt_neox", "v2", True), ("tiny_mpt", "v2", False)],
)
def test_packed_rows_give_the_padded_loss_and_gradients(config, semantics, packs):
    """LMs with position ids train on packed rows (fewer tokens); the loss and every gradient are those of the
    padded rows. MPT (ALiBi, no position ids) keeps its padded rows."""
    from lavis.models.flamingo import packing as packing_module

    cfg = OmegaConf.to_container(read_yaml(f"lavis/configs/models/openflamingo/{config}.yaml").model)
    model = build_model({**cfg, "xattn_semantics": semantics}).train()
    open_gates(model, 0.7)
    batch = training_batch(model)  # rows of 4 lengths, one without a target
    seen = []
    hook = model.lang_encoder.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    packed, packed_grads = loss_and_grads(model, batch, loss_only=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packing_module.Packing, "for_targets", classmethod(lambda cls, *args: None))
        padded, padded_grads = loss_and_grads(model, batch, loss_only=True)
    hook.remove()
    assert (seen[0][0] * seen[0][1] < seen[1][0] * seen[1][1]) == packs, seen
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.logits, padded.logits, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)

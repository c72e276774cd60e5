"""Cached continuation scoring equals scoring each (context, continuation) from scratch, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from lavis.common.config import read_yaml
from lavis.common.errors import DataError
from lavis.models import build_model

torch.set_num_threads(1)
PROMPTS = [
    "a circle<image>output: a red circle.<|endofchunk|><image>output:",
    "<image>output: two blue squares.<|endofchunk|><image>output:",
    "<image>output:",
]
NAMES = ["a red circle", "blue", "three green triangles on the left", "square"]


def tiny_model():
    cfg = {
        k: (dict(v) if hasattr(v, "items") else v)
        for k, v in read_yaml("lavis/configs/models/openflamingo/tiny.yaml").model.items()
    }
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # open gates with some spread so the images matter
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.2)
            block.ff_gate.fill_(0.7)
        emb = model.lang_encoder.get_input_embeddings().weight
        emb.add_(0.05 * torch.randn(emb.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def batch(model):
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding="longest")
    g = torch.Generator().manual_seed(1)
    vision_x = torch.randn(len(PROMPTS), 2, 1, 3, model.image_size, model.image_size, generator=g)
    conts = [tok(n, add_special_tokens=False).input_ids for n in NAMES]
    return vision_x, enc.input_ids, enc.attention_mask, conts


def from_scratch(model, vision_x, ids, mask, conts, normalize_length):
    """One plain forward over context + continuation per pair: the definition of the score."""
    out = torch.zeros(ids.shape[0], len(conts))
    with torch.no_grad():
        for j, cont in enumerate(conts):
            c = torch.tensor(cont)[None].expand(ids.shape[0], -1)
            full = torch.cat([ids, c], 1)
            logits = model(vision_x, full, torch.cat([mask, torch.ones_like(c)], 1)).logits.float()
            logp = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1).gather(-1, c[..., None]).squeeze(-1)
            out[:, j] = logp.mean(-1) if normalize_length else logp.sum(-1)
    return out


@pytest.mark.parametrize("semantics", ["v1", "v2"])
@pytest.mark.parametrize("normalize_length", [True, False])
def test_cached_scoring_equals_scoring_from_scratch(model, semantics, normalize_length):
    model.xattn_semantics = semantics
    vision_x, ids, mask, conts = batch(model)
    expected = from_scratch(model, vision_x, ids, mask, conts, normalize_length)
    for batch_size in (1, 3, 16):  # 3: a last, partial batch
        got = model.score(vision_x, ids, mask, conts, normalize_length=normalize_length, batch_size=batch_size)
        assert got.shape == (3, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    model.xattn_semantics = "v2"


def test_scores_depend_on_the_last_image_under_v2(model):
    vision_x, ids, mask, conts = batch(model)
    base = model.score(vision_x, ids, mask, conts)
    other = vision_x.clone()
    other[:, 1] += 1.0  # every row's last image
    moved = model.score(other, ids, mask, conts)
    assert (moved - base).abs().amax() > 1e-4
    first = vision_x.clone()
    first[2, 1] += 1.0  # row 2 has a single <image>: its second image is never attended
    assert torch.equal(model.score(first, ids, mask, conts)[2], base[2])


def test_bad_inputs_are_data_errors(model):
    vision_x, ids, mask, conts = batch(model)
    with pytest.raises(DataError, match="continuation 1 is empty"):
        model.score(vision_x, ids, mask, [conts[0], []])
    with pytest.raises(DataError, match="contains <image>"):
        model.score(vision_x, ids, mask, [[model.media_token_id]])
    right = mask.flip(1)
    with pytest.raises(DataError, match="left-padded"):
        model.score(vision_x, ids, right, conts)

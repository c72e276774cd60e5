"""OpenFlamingo's attention formulas, written out term by term from the release's behaviour.

The baseline of the benchmarks (``fewshot_eval.reference_computation`` swaps them in) and the reference of
``tests/test_flamingo_fast_paths.py``, which checks that the project's fused paths give their outputs and
gradients: one copy, so the formulas the benchmark times are the ones the tests hold the project to.
"""

from __future__ import annotations

import torch

from lavis.models.flamingo.perceiver import merge_heads, split_heads


def release_cross_attention(attn, x, media, index):
    """OpenFlamingo's MaskedCrossAttention: keys/values from the media at every call, dense masked softmax."""
    b, t_img, n, _ = media.shape
    q = split_heads(attn.to_q(attn.norm(x)), attn.heads) * attn.scale
    k, v = attn.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)
    k, v = split_heads(k, attn.heads), split_heads(v, attn.heads)
    sim = q @ k.transpose(-1, -2)
    media_time = torch.arange(1, t_img + 1).repeat_interleave(n)
    sim = sim.masked_fill(index[:, None, :, None] != media_time, -torch.finfo(sim.dtype).max)
    weights = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    weights = weights.masked_fill(~((index > 0) & (index <= t_img))[:, None, :, None], 0.0)
    return attn.to_out(merge_heads(weights @ v))


def release_perceiver_attention(attn, media, latents):
    """OpenFlamingo's PerceiverAttention with the explicit softmax."""
    if latents.dim() == 2:  # the release repeats the learned latents for every image
        latents = latents.expand(*media.shape[:-2], *latents.shape)
    media, latents = attn.norm_media(media), attn.norm_latents(latents)
    q = split_heads(attn.to_q(latents), attn.heads) * attn.scale
    k, v = attn.to_kv(torch.cat((media, latents), dim=-2)).chunk(2, dim=-1)
    k, v = split_heads(k, attn.heads), split_heads(v, attn.heads)
    sim = q @ k.transpose(-1, -2)
    return attn.to_out(merge_heads((sim - sim.amax(-1, keepdim=True).detach()).softmax(-1) @ v))

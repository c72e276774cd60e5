"""Gated cross-attention dense block and the two media-masking semantics (v1 release, v2/paper).

A *media index* per text token says which image it may attend to: 0 = none, k = the k-th ``<image>``
of its row (``vision_x[b, k-1]``).

- ``v1`` (OpenFlamingo-9B release, ``attend_previous=False``): each ``<image>`` token attends its own
  image, the text after image k attends image k+1, text before the first image attends image 1, text
  after the last image attends nothing. Computed from the ids of the current call only, so with a KV
  cache the generated tokens attend nothing (exactly what the release did).
- ``v2`` (Flamingo paper, OpenFlamingo v2): a token attends the most recent ``<image>`` at or before it,
  nothing before the first one; with a KV cache the count continues from the cached prefix, so
  generated tokens attend the prompt's last image.
"""

from __future__ import annotations

import torch
from torch import nn

from lavis.models.flamingo.perceiver import feed_forward, merge_heads, split_heads

XATTN_SEMANTICS = ("v1", "v2")


def media_index_v1(input_ids: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """Per-token media index of the v1 release ("next image") for ids (B, L) -> LongTensor (B, L)."""
    is_media = input_ids == media_token_id
    index = is_media.cumsum(dim=-1)
    index = torch.where(is_media, index, index + 1)
    num_media = is_media.sum(dim=-1, keepdim=True)
    return torch.where(index > num_media, torch.zeros_like(index), index)


def media_index_v2(input_ids: torch.Tensor, media_token_id: int,
                   past_media_count: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token media index of the paper/v2 ("most recent image at or before") for ids (B, L).

    ``past_media_count`` (B,) is the number of ``<image>`` tokens already in the KV cache.
    """
    index = (input_ids == media_token_id).cumsum(dim=-1)
    if past_media_count is not None:
        index = index + past_media_count.to(index.device)[:, None]
    return index


def media_index(input_ids: torch.Tensor, media_token_id: int, semantics: str,
                past_media_count: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``semantics`` ("v1" or "v2"); see the module docstring."""
    if semantics == "v1":
        return media_index_v1(input_ids, media_token_id)
    if semantics == "v2":
        return media_index_v2(input_ids, media_token_id, past_media_count)
    raise ValueError(f"xattn semantics must be one of {XATTN_SEMANTICS}, got {semantics!r}")


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the latents of the single image chosen by the media index."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), media (B, T_img, n, Dv), index (B, L) -> (B, L, D)."""
        b, t_img, n, _ = media.shape
        q = split_heads(self.to_q(self.norm(x)), self.heads) * self.scale
        k, v = self.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        sim = q @ k.transpose(-1, -2)  # (B, h, L, T_img * n)
        media_time = torch.arange(1, t_img + 1, device=x.device).repeat_interleave(n)
        allowed = index[:, None, :, None] == media_time[None, None, None, :]
        sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        # A token with no image (index 0, or an index past the images given) gets exactly zero output.
        attends = (index > 0) & (index <= t_img)
        attn = attn.masked_fill(~attends[:, None, :, None], 0.0)
        return self.to_out(merge_heads(attn @ v))


class GatedCrossAttentionBlock(nn.Module):
    """x += tanh(attn_gate) * xattn(x); x += tanh(ff_gate) * FF(x). Gates start at 0 (a no-op)."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Apply the block; the feed-forward is not masked (every token gets it, as in the release)."""
        x = self.attn(x, media, index) * self.attn_gate.tanh() + x
        x = self.ff(x) * self.ff_gate.tanh() + x
        return x

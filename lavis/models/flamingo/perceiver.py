"""Perceiver resampler: turns a variable number of vision tokens into a fixed set of latents.

Parameter names follow OpenFlamingo's ``checkpoint.pt`` (``perceiver.layers.{i}.0.norm_media`` ...
``perceiver.layers.{i}.1.3.weight``) so the released weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear -> exact GELU -> Linear (no biases), indexed 0/1/2/3 like the checkpoint."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),  # the release uses the erf GELU; the tanh approximation moves logits by ~1e-3
        nn.Linear(inner, dim, bias=False),
    )


def scaled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, disallowed: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax((q * scale) k^T) v, in the release's order of operations: (..., n, d) -> (..., n, d).

    Written out instead of a fused kernel on purpose: the query is scaled before the product and the row
    maximum subtracted explicitly, as the OpenFlamingo release computes it, so that our float32 outputs
    round like the reference (a fused kernel scales the product instead, ~1e-6 apart, which the tiny v2
    fixtures' sharp attention amplifies past their 1e-4 tolerance). The scores are small here (keys are
    media latents), so materialising them costs little. ``disallowed`` (broadcast to the scores, True =
    masked) gets the lowest finite score, so a fully masked row stays finite (uniform).
    """
    sim = (q * scale) @ k.transpose(-1, -2)
    if disallowed is not None:
        sim = sim.masked_fill(disallowed, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1) @ v


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., n, heads * d) -> (..., heads, n, d); feature index = head * d + j, as in the release."""
    *lead, n, hd = x.shape
    return x.reshape(*lead, n, heads, hd // heads).movedim(-2, -3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, n, d) -> (..., n, heads * d)."""
    x = x.movedim(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents); keys/values from both, queries from the latents."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (b, T, n, D), latents (b, T, m, D), or (m, D) shared by every image -> (b, T, m, D).

        Shared latents (the first layer's: the learned ones, the same for every image) have their
        queries and their keys/values computed once, not once per image; each row of a projection is
        computed on its own, so the values are the same as per image.
        """
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        if latents.dim() == 2:
            images = media.shape[:-2]
            q = self.to_q(latents).expand(*images, -1, -1)
            kv = torch.cat((self.to_kv(media), self.to_kv(latents).expand(*images, -1, -1)), dim=-2)
        else:
            q = self.to_q(latents)
            kv = self.to_kv(torch.cat((media, latents), dim=-2))
        k, v = kv.chunk(2, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        return self.to_out(merge_heads(scaled_attention(q, k, v, self.scale)))


class PerceiverResampler(nn.Module):
    """Learned latents refined by ``depth`` (attention, feed-forward) pairs, then a final LayerNorm.

    No media-time or frame embeddings: OpenFlamingo-9B was trained without them.
    """

    def __init__(
        self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64, ff_mult: int = 4
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, T, F, v, D) vision tokens -> (b, T, num_latents, D)."""
        b, t, f, v, d = x.shape
        x = x.reshape(b, t, f * v, d)  # frames are flattened into one token set per media
        latents = self.latents.to(x.dtype)  # (m, D): shared by every image until the first attention
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)

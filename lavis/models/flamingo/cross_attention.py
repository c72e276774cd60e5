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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis.models.flamingo.packing import Packing
from lavis.models.flamingo.perceiver import feed_forward, merge_heads, scaled_attention, split_heads

XATTN_SEMANTICS = ("v1", "v2")


class MediaKV(NamedTuple):
    """Cross-attention keys and values of one block for a media batch: k, v (B, heads, T_img * n, dim_head)."""

    k: torch.Tensor
    v: torch.Tensor
    num_media: int
    num_latents: int


def media_index_v1(input_ids: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """Per-token media index of the v1 release ("next image") for ids (B, L) -> LongTensor (B, L)."""
    is_media = input_ids == media_token_id
    if input_ids.shape[-1] == 1:
        # One token per row (every cached decoding step): an <image> token attends its own image (1),
        # any other token attends nothing (0): the general formula below gives exactly this.
        return is_media.long()
    index = is_media.cumsum(dim=-1)
    index = torch.where(is_media, index, index + 1)
    num_media = is_media.sum(dim=-1, keepdim=True)
    return torch.where(index > num_media, torch.zeros_like(index), index)


def media_index_v2(
    input_ids: torch.Tensor, media_token_id: int, past_media_count: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token media index of the paper/v2 ("most recent image at or before") for ids (B, L).

    ``past_media_count`` (B,) is the number of ``<image>`` tokens already in the KV cache.
    """
    index = (input_ids == media_token_id).cumsum(dim=-1)
    if past_media_count is not None:
        index = index + past_media_count.to(index.device)[:, None]
    return index


def media_index(
    input_ids: torch.Tensor, media_token_id: int, semantics: str, past_media_count: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch on ``semantics`` ("v1" or "v2"); see the module docstring."""
    if semantics == "v1":
        return media_index_v1(input_ids, media_token_id)
    if semantics == "v2":
        return media_index_v2(input_ids, media_token_id, past_media_count)
    raise ValueError(f"xattn semantics must be one of {XATTN_SEMANTICS}, got {semantics!r}")


def attends_image(index: torch.Tensor, num_media: int) -> torch.Tensor:
    """Which tokens attend an image: a media index in ``1 .. num_media`` (0, or past the images given: none)."""
    return (index > 0) & (index <= num_media)


def segment_attention(
    q: torch.Tensor, kv: MediaKV, index: torch.Tensor, attends: torch.Tensor, group: int, scale: float
) -> torch.Tensor:
    """Each token's attention over the latents of its own image only: q (B_lm, L, h, d) -> (B_lm, L, h * d).

    A token attends one image, so the dense masked attention over all ``T_img * n`` latents spends
    ``T_img - 1`` of every ``T_img`` scores on keys the mask then drops (8 of 9 in an 8-shot prompt). Here
    the tokens of each (media row, image) pair are gathered into a segment of ``group x S`` slots (``S`` =
    the most tokens a row gives one image; a group's rows side by side, as they share their media row),
    each segment attends only its image's ``n`` latents, a view of the keys, and the outputs go back to
    their tokens. The scores kept are the dense path's (a masked key gets weight exactly 0 there), so
    the result is the same to float rounding. Tokens that attend nothing get zeros (the caller zeroes them
    anyway), and slots no token fills hold a zero query.
    """
    rows, length, heads, dim = q.shape
    t_img, n = kv.num_media, kv.num_latents
    b = rows // group
    members = (index[..., None] == torch.arange(1, t_img + 1, device=q.device)) & attends[..., None]
    rank = members.cumsum(dim=1)  # (B_lm, L, T_img): a token's rank within its (row, image) segment, from 1
    slots = int(rank[:, -1].max())
    image = (index - 1).clamp(0, t_img - 1)  # any image for a token that attends nothing
    offset = rank.gather(2, image[..., None])[..., 0].clamp(min=1) - 1
    row = torch.arange(rows, device=q.device)[:, None]
    # Slot layout (b, T_img, group, S): row r = b * group + g.
    slot = ((row // group * t_img + image) * group + row % group) * slots + offset
    slot = torch.where(attends, slot, b * t_img * group * slots)  # one spare slot takes the rest
    # Unfilled slots read a zero query row (appended last), not some token's query.
    token = torch.full((b * t_img * group * slots + 1,), rows * length, dtype=torch.long, device=q.device)
    token.scatter_(0, slot.flatten(), torch.arange(rows * length, device=q.device))
    q_rows = torch.cat((q.reshape(rows * length, heads, dim), q.new_zeros(1, heads, dim)))
    q_seg = q_rows.index_select(0, token[:-1])
    q_seg = q_seg.view(b, t_img, group * slots, heads, dim).permute(0, 3, 1, 2, 4)  # (b, h, T_img, gS, d)
    k = kv.k.view(b, heads, t_img, n, dim)
    v = kv.v.view(b, heads, t_img, n, dim)
    out = scaled_attention(q_seg, k, v, scale).permute(0, 2, 3, 1, 4).reshape(-1, heads * dim)
    out = torch.cat((out, out.new_zeros(1, heads * dim)))  # the spare slot's output
    return out.index_select(0, slot.flatten()).view(rows, length, heads * dim)


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the latents of the single image chosen by the media index.

    The media keys/values do not depend on the text, so they are computed once per generate call
    (:meth:`media_kv`) and every decoding step reuses them. The LM batch may hold ``group`` adjacent
    rows per media row (beams, returned sequences): their queries are folded into the query length of
    their media row, so the shared keys/values are never copied per beam.
    """

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_kv(self, media: torch.Tensor) -> MediaKV:
        """Keys and values of media (B, T_img, n, Dv): each (B, heads, T_img * n, dim_head)."""
        b, t_img, n, _ = media.shape
        k, v = self.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)
        return MediaKV(split_heads(k, self.heads), split_heads(v, self.heads), t_img, n)

    def forward(self, x: torch.Tensor, media: torch.Tensor | MediaKV, index: torch.Tensor) -> torch.Tensor | None:
        """x (B_lm, L, D), media (B, T_img, n, Dv) or its :class:`MediaKV`, index (B_lm, L) -> (B_lm, L, D).

        ``B_lm`` is a multiple of the media batch ``B``: rows ``b * g ... b * g + g - 1`` share media row ``b``.
        A token with no image (index 0, or past the images given) gets exactly zero output, and no work:
        only the span of the call's tokens that attend an image is computed; None when no token does.
        """
        kv = media if isinstance(media, MediaKV) else self.media_kv(media)
        attends = attends_image(index, kv.num_media)
        if not attends.any():  # e.g. every v1 decoding step
            return None
        columns = attends.any(dim=0).nonzero()
        first, last = int(columns[0]), int(columns[-1]) + 1
        rows, length = x.shape[0], last - first
        b = kv.k.shape[0]
        group = rows // b
        q = self.to_q(self.norm(x[:, first:last]))
        span, span_attends = index[:, first:last], attends[:, first:last]
        if length > 1 and kv.num_media > 1:  # prompts and training; a decoding step's one token: dense
            out = segment_attention(q.view(rows, length, self.heads, -1), kv, span, span_attends, group, self.scale)
        else:
            q = split_heads(q, self.heads)  # (B_lm, h, L', d)
            # Fold the group into the query length: (B, h, group * L', d) against the B media rows.
            q = q.reshape(b, group, self.heads, length, -1).transpose(1, 2).reshape(b, self.heads, group * length, -1)
            media_time = torch.arange(1, kv.num_media + 1, device=x.device).repeat_interleave(kv.num_latents)
            allowed = span.reshape(b, group * length, 1) == media_time
            # A token that attends nothing gets a finite (uniform) row here; its output is zeroed below.
            out = scaled_attention(q, kv.k, kv.v, self.scale, disallowed=~allowed[:, None])
            out = out.reshape(b, self.heads, group, length, -1).transpose(1, 2).reshape(rows, self.heads, length, -1)
            out = merge_heads(out)
        out = self.to_out(out).masked_fill(~span_attends[..., None], 0.0)
        return F.pad(out, (0, 0, first, x.shape[1] - last))


class GatedCrossAttentionBlock(nn.Module):
    """x += tanh(attn_gate) * xattn(x); x += tanh(ff_gate) * FF(x). Gates start at 0 (a no-op)."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor | MediaKV | None,
        index: torch.Tensor | None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Apply the block; the feed-forward is not masked (every token gets it, as in the release).

        ``index`` None: no token of the call attends an image, so the attention is skipped (``media`` unused).
        With ``packing``, ``x`` holds packed rows (lavis.models.flamingo.packing) and ``index`` is of the
        padded rows: only the attention runs on the padded layout, next to each sample's images.
        """
        if index is None:
            attended = None
        elif packing is None:
            attended = self.attn(x, media, index)
        else:
            attended = self.attn(packing.unpack(x), media, index)
            attended = None if attended is None else packing.repack(attended.new_zeros(x.shape), attended)
        if attended is not None:  # adding the zero output of a call with no image would change nothing
            x = attended * self.attn_gate.tanh() + x
        x = self.ff(x) * self.ff_gate.tanh() + x
        return x

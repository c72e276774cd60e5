"""Beams that share their prompt: one copy of its keys/values per sample, not one per beam.

The beams of a sample continue the same prompt, so after the prompt pass the rows of a sample hold
identical keys/values for every prompt position. Repeating them per beam (``batch_repeat_interleave``)
costs a copy, ``num_beams`` times the memory, and at every decoding step ``num_beams`` reads of the
same prompt: at 8 shots the prompt is most of the cache, and a one-token query is bound by reading it.

Here a :class:`SharedPromptLayer` keeps a layer's prompt once per sample (B rows) and appends the
beams' new tokens after it, interleaved by step (positions ``P + step * beams + slot``): a token stays
where it was written. A decoding step's ``B * beams`` queries are folded into ``beams`` queries of
their sample's row (:func:`shared_prompt_sdpa`), so one SDPA call reads the prompt once per sample,
and the mask of :class:`SharedPrompt` lets each beam see the prompt (its padding masked) and, at each
earlier step, the slot its own ancestor wrote. A beam reorder then moves no keys or values at all: it
permutes the beams' ancestries, (B * beams, steps) integers for every layer together. Each beam attends
exactly the keys it attends with the repeated cache, in another order, so the result is the same up to
float rounding of the sum over keys (test: the same tokens as HF generation).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lavis.models.flamingo.kv_cache import ReorderPlan, ReservedLayer

ATTENTION = "flamingo_shared_prompt"


def shared_prompt_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF's SDPA attention, with one-token queries of ``beams`` rows folded onto a shared-prompt cache.

    ``key`` of fewer rows than ``query`` comes from a :class:`SharedPromptLayer`: (B, h, L, d) for
    queries (B * beams, h, 1, d) and a mask (B, 1, beams, L). Any other call is plain SDPA.
    """
    rows, heads, length, dim = query.shape
    if key.shape[0] == rows:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    samples = key.shape[0]
    if length != 1 or rows % samples or key.shape[1] != heads:
        raise ValueError(f"shared-prompt attention takes one-token queries per beam, got {tuple(query.shape)}")
    # Without its mask every beam would see every beam's tokens: refuse rather than mix them.
    expected = (samples, 1, rows // samples, key.shape[2])
    if attention_mask is None or tuple(attention_mask.shape) != expected:
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"shared-prompt attention needs its SharedPrompt mask {expected}, got {got}")
    q = query.reshape(samples, rows // samples, heads, dim).transpose(1, 2)  # (B, h, beams, d)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).reshape(rows, 1, heads, dim), None


AttentionInterface.register(ATTENTION, shared_prompt_sdpa)


@contextlib.contextmanager
def shared_prompt_attention(lm):
    """Within the block ``lm``'s attention layers run :func:`shared_prompt_sdpa` (plain SDPA otherwise).

    The switch is on the LM's config, read by its attention layers at every call: one generation at a
    time per model (not re-entrant, not thread-safe). LLaMA's config has no sub-configs to keep apart.
    """
    before = lm.config._attn_implementation
    lm.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        lm.config._attn_implementation = before


class SharedPromptLayer(ReservedLayer):
    """A :class:`ReservedLayer` whose first ``prompt`` positions are stored once per sample (see module)."""

    def __init__(self, layer: ReservedLayer, beams: int):
        super().__init__(layer.capacity)
        self.beams, self.prompt = beams, layer.length
        self.device, self.is_initialized, self.length = layer.device, True, layer.length
        steps = max(1, layer._buffers[0].shape[2] - layer.length)  # the new tokens the reservation has room for
        self._buffers = [self._grown(t[:, :, : layer.length], layer.length + beams * steps) for t in layer._buffers[:2]]
        self._publish()

    @staticmethod
    def _grown(filled: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, n, d = filled.shape
        out = filled.new_empty((b, h, capacity, d))
        out[:, :, :n] = filled
        return out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, heads, new, dim = key_states.shape
        if new != 1 or rows != self._buffers[0].shape[0] * self.beams:
            raise ValueError(f"a shared-prompt cache takes one token per beam row, got keys {tuple(key_states.shape)}")
        end = self.length + self.beams
        if end > self._buffers[0].shape[2]:
            self._buffers = [self._grown(t[:, :, : self.length], 2 * end) for t in self._buffers]
        for buffer, states in zip(self._buffers, (key_states, value_states)):
            buffer[:, :, self.length : end] = states.reshape(-1, self.beams, heads, dim).transpose(1, 2)
        self.length = end
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """The positions each beam row sees: the prompt and its own new tokens."""
        return self.prompt + (self.length - self.prompt) // self.beams

    def reorder_cache(self, beam_idx: torch.LongTensor, plan: ReorderPlan | None = None) -> None:
        raise ValueError("a shared-prompt cache is reordered through its SharedPrompt's ancestries")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("a shared-prompt cache already serves its beams")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("a shared-prompt cache cannot select rows")


class SharedPrompt:
    """The beams' ancestries over a shared-prompt cache, and the attention mask they give (see the module).

    ``ancestors[r, s]``: the slot, among its sample's ``beams`` slots of step ``s``, of the token beam row
    ``r`` continues at that step.
    """

    def __init__(self, prompt_mask: torch.Tensor, beams: int):
        samples, _ = prompt_mask.shape
        self.beams = beams
        self.prompt_mask = prompt_mask.bool()[:, None, None, :].expand(-1, 1, beams, -1)
        self.slots = torch.arange(beams, device=prompt_mask.device)
        self.rows = torch.arange(samples * beams, device=prompt_mask.device)
        self.ancestors = torch.empty(samples * beams, 0, dtype=torch.long, device=prompt_mask.device)

    def reorder(self, beam_rows: torch.Tensor) -> None:
        """Row ``r`` continues row ``beam_rows[r]``, a beam of the same sample (beam search's reorder)."""
        if not torch.equal(beam_rows // self.beams, self.rows // self.beams):
            raise ValueError("a shared-prompt cache can only reorder beams within their sample")
        self.ancestors = self.ancestors.index_select(0, beam_rows)

    def next_mask(self) -> torch.Tensor:
        """The mask (B, 1, beams, P + beams * steps) of the step about to run: each row's new token takes
        its own slot, after the prompt and its ancestors' tokens."""
        own = self.slots.repeat(self.rows.shape[0] // self.beams)[:, None]
        self.ancestors = torch.cat((self.ancestors, own), dim=1)
        seen = self.ancestors[..., None] == self.slots  # (B * beams, steps, beams)
        seen = seen.view(-1, self.beams, self.ancestors.shape[1] * self.beams)[:, None]
        return torch.cat((self.prompt_mask, seen), dim=-1)


def share_prompt(cache, beams: int, prompt_mask: torch.Tensor, config) -> SharedPrompt | None:
    """Turn the layers of ``cache`` (B rows) into shared-prompt layers for ``beams``: the :class:`SharedPrompt`
    that reorders and masks them. None, and ``cache`` untouched, where it cannot: a layer that is not a
    filled :class:`ReservedLayer` (a sliding window, ...), or grouped-query attention in the LM ``config``
    (fewer key/value heads than query heads; :func:`shared_prompt_sdpa` folds beams, not heads)."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "num_key_value_heads", None) not in (None, text.num_attention_heads):
        return None
    if not cache.layers or any(type(layer) is not ReservedLayer or not layer.length for layer in cache.layers):
        return None
    cache.layers = [SharedPromptLayer(layer, beams) for layer in cache.layers]
    return SharedPrompt(prompt_mask, beams)

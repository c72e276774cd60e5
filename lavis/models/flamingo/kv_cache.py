"""A KV cache for one ``generate`` call whose storage is reserved once for the prompt and every new token.

HF's ``DynamicCache`` concatenates each new token onto the whole cache (a full copy per layer and step)
and reorders beams with ``index_select`` into fresh tensors. Here every layer owns two buffers sized for
the whole call: a token is written in place, a beam reorder gathers into the other buffer (one copy, no
allocation) and is skipped when every beam continues itself. When the prompt's prefix was computed once
per sample and repeated per beam (``batch_repeat_interleave``), those positions hold identical copies in
the rows of a sample, and beam search only ever permutes the rows of one sample: a reorder then moves
only the positions after the prefix (the generated tokens). The values are exactly the same as with
``DynamicCache``; only where they are stored differs. Which of these cases a beam reorder is (identity,
within-sample permutation, any other) is worked out once per decoding step for all layers
(:class:`ReorderPlan`), not once per layer.

Our beam search runs the whole prompt once per sample: for LLaMA it then keeps the prompt once per
sample for all beams (lavis.models.flamingo.shared_prompt builds on these layers); for the other
families it repeats the layers per beam as above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReorderPlan:
    """One beam reorder (``beam_idx`` on ``device``) and which case it is, shared by the layers of a cache."""

    def __init__(self, beam_idx: torch.Tensor, device):
        self.beam_idx = beam_idx.to(device)
        self.rows = torch.arange(self.beam_idx.shape[0], device=device)
        self.identity = torch.equal(self.beam_idx, self.rows)  # every beam continued itself
        self._within: dict[int, bool] = {}

    def within_groups(self, group: int) -> bool:
        """Whether every row takes a row of its own group of ``group`` adjacent rows (one sample's beams)."""
        if group not in self._within:
            self._within[group] = torch.equal(self.beam_idx // group, self.rows // group)
        return self._within[group]


class ReservedLayer(DynamicLayer):
    """One layer's keys/values in buffers of ``capacity`` positions (grown by doubling if ever exceeded)."""

    is_croppable = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._buffers: list[torch.Tensor] = []  # [keys, values], then the spare pair for reordering
        # Positions [0, shared) are identical in each group of `group` adjacent rows (one sample's beams).
        self.shared = 0
        self.group = 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._buffers = [self._empty(key_states, self.capacity), self._empty(value_states, self.capacity)]
        self.length = 0
        self._publish()
        self.is_initialized = True

    @staticmethod
    def _empty(like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return like.new_empty((b, h, capacity, d))

    def _publish(self) -> None:
        # What attention reads: views of the filled part (SDPA takes strided keys/values).
        self.keys = self._buffers[0][:, :, : self.length]
        self.values = self._buffers[1][:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._buffers[0].shape[2]:
            self._resize(max(end, 2 * self._buffers[0].shape[2]))
        self._buffers[0][:, :, self.length : end] = key_states
        self._buffers[1][:, :, self.length : end] = value_states
        self.length = end
        self._publish()
        return self.keys, self.values

    def _resize(self, capacity: int) -> None:
        old = self._buffers[:2]
        self._buffers = [self._empty(t, capacity) for t in old]
        for new, t in zip(self._buffers, old):
            new[:, :, : self.length] = t[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reorder_cache(self, beam_idx: torch.LongTensor, plan: ReorderPlan | None = None) -> None:
        if self.length == 0:
            return
        if plan is None:
            plan = ReorderPlan(beam_idx, self.device)
        beam_idx = plan.beam_idx
        if plan.identity:
            return  # every beam continued itself
        if self.shared and plan.within_groups(self.group):
            # Within-sample permutation: the shared prefix is the same in every row it could come from.
            keys, values = self._buffers[:2]
            span = slice(self.shared, self.length)
            keys[:, :, span] = keys[:, :, span].index_select(0, beam_idx)
            values[:, :, span] = values[:, :, span].index_select(0, beam_idx)
            return
        if len(self._buffers) == 2:
            self._buffers += [torch.empty_like(t) for t in self._buffers]
        keys, values, spare_k, spare_v = self._buffers
        torch.index_select(keys[:, :, : self.length], 0, beam_idx, out=spare_k[:, :, : self.length])
        torch.index_select(values[:, :, : self.length], 0, beam_idx, out=spare_v[:, :, : self.length])
        self._buffers = [spare_k, spare_v, keys, values]
        self._publish()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._buffers = [t.repeat_interleave(repeats, dim=0) for t in self._buffers[:2]]
            if self.group == 1:
                self.shared, self.group = self.length, repeats
            else:  # repeated twice: keep no claim rather than a wrong one
                self.shared, self.group = 0, 1
            self._publish()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._buffers = [t[indices] for t in self._buffers[:2]]
            self.shared, self.group = 0, 1
            self._publish()


class ReservedCache(DynamicCache):
    """A ``DynamicCache`` whose beam reorder is classified once per step for all its :class:`ReservedLayer` s.

    ``after_reorder(beam_idx)``, when set, runs after every reorder: the model's own per-row state that
    must follow the beams (Flamingo's count of the ``<image>`` tokens each row has seen).
    """

    after_reorder: Callable[[torch.Tensor], None] | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        plans: dict = {}  # one per device (a model split over devices)
        for layer in self.layers:
            if isinstance(layer, ReservedLayer) and layer.length:
                plan = plans.get(layer.device)
                if plan is None:
                    plan = plans[layer.device] = ReorderPlan(beam_idx, layer.device)
                layer.reorder_cache(beam_idx, plan)
            else:
                layer.reorder_cache(beam_idx)
        if self.after_reorder is not None:
            self.after_reorder(beam_idx)


def reserved_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers reserve ``capacity`` positions.

    Layers of another kind (sliding windows) keep HF's own implementation.
    """
    cache = ReservedCache(config=config)
    if cache.layers:
        cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:  # the config did not list its layers: HF would append DynamicLayers on first use
        cache.layer_class_to_replicate = None
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        cache.layers = [ReservedLayer(capacity) for _ in range(num_layers)]
    return cache

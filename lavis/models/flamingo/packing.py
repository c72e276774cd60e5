"""Sequence packing for the training loss: the LM runs on the tokens that matter, not on padding.

A batch of interleaved samples (0..K demonstrations before the target) is padded to its longest row:
with 1 to 5 images per sample about half of the tokens are padding, and the LM layers (most of a
step) compute them all. :class:`Packing` places each row's tokens up to its last labelled position
into as few rows ("bins", as wide as the longest such row) as first-fit decreasing finds, with the
position ids restarting at 0 for every sample. Given position ids and no attention mask, transformers
builds the block-diagonal causal mask of packed sequences itself (in the format of the LM's attention
implementation), so each token sees exactly the tokens of its own sample, at the positions it had in
its row: the same hidden states, loss and gradients as the padded rows.

The cross-attention blocks need each sample's tokens next to its own images: around a block the packed
hidden states are scattered back to the padded (sample, column) layout (:meth:`unpack`) and gathered
again after it (:meth:`repack`).
"""

from __future__ import annotations

import torch


class Packing:
    """Where each kept token of a right-padded batch goes in the packed rows (see the module docstring).

    ``widths[r]``: the tokens kept from row ``r`` (a prefix of it; 0 drops the row).
    """

    def __init__(self, input_ids: torch.Tensor, widths: list[int], pad_token_id: int):
        batch = input_ids.shape[0]
        capacity = max(widths)
        bins: list[list[int]] = []  # rows placed in each bin, in order
        room: list[int] = []
        for row in sorted((r for r in range(batch) if widths[r]), key=lambda r: (-widths[r], r)):
            slot = next((i for i, free in enumerate(room) if free >= widths[row]), None)
            if slot is None:
                bins.append([])
                room.append(capacity)
                slot = len(bins) - 1
            bins[slot].append(row)
            room[slot] -= widths[row]
        rows, cols, bin_of, pos_of = [], [], [], []
        positions = torch.zeros(len(bins), capacity, dtype=torch.long)
        for b, members in enumerate(bins):
            start = 0
            for row in members:
                w = widths[row]
                rows += [row] * w
                cols += range(w)
                bin_of += [b] * w
                pos_of += range(start, start + w)
                positions[b, start : start + w] = torch.arange(w)
                start += w
            # The free tail is one more sequence (positions from 0): it sees only itself and feeds no loss.
            positions[b, start:] = torch.arange(capacity - start)
        device = input_ids.device
        self.batch, self.width = batch, capacity
        self.rows = torch.tensor(rows, device=device)  # (N,) source row of each kept token
        self.cols = torch.tensor(cols, device=device)  # (N,) its column there
        self.bins = torch.tensor(bin_of, device=device)  # (N,) its packed row
        self.slots = torch.tensor(pos_of, device=device)  # (N,) its column in the packed row
        self.positions = positions.to(device)
        self.input_ids = torch.full((len(bins), capacity), pad_token_id, dtype=input_ids.dtype, device=device)
        self.input_ids[self.bins, self.slots] = input_ids[self.rows, self.cols]

    @classmethod
    def for_targets(cls, input_ids, attention_mask, predicts: torch.Tensor, pad_token_id) -> Packing | None:
        """The packing of each row up to its last position that predicts a label, or None where it does
        not apply: no target at all, or a row whose kept tokens are not all real (not right-padded)."""
        last = torch.where(predicts, torch.arange(predicts.shape[1], device=predicts.device), -1).amax(-1)
        widths = (last + 1).tolist()
        if max(widths) <= 0:
            return None
        if attention_mask is not None:
            kept = torch.arange(input_ids.shape[1], device=input_ids.device) < (last + 1)[:, None]
            if bool((kept & (attention_mask == 0)).any()):
                return None
        return cls(input_ids, widths, 0 if pad_token_id is None else int(pad_token_id))

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed (bins, width, D) -> padded (batch, width, D); dropped and padding positions are zeros."""
        padded = hidden.new_zeros(self.batch, self.width, hidden.shape[-1])
        return padded.index_put((self.rows, self.cols), hidden[self.bins, self.slots])

    def repack(self, hidden: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """``hidden`` (packed) with its kept tokens replaced by those of ``padded`` (batch, width, D)."""
        return hidden.index_put((self.bins, self.slots), padded[self.rows, self.cols])

    def locate(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed row, column) of the kept tokens at (``rows``, ``cols``) of the padded batch."""
        where = torch.full((self.batch, self.width), -1, dtype=torch.long, device=self.rows.device)
        where[self.rows, self.cols] = torch.arange(len(self.rows), device=self.rows.device)
        index = where[rows, cols]
        return self.bins[index], self.slots[index]

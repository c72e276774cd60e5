"""Generated token ids -> text, with no special-token text whatever the tokenizer version.

``decode(ids, skip_special_tokens=True)`` is not enough: the ``tokenizers`` versions that come with
transformers 5 keep an added token whose ``normalized`` flag is set (LLaMA's ``<s>``, ``</s>``,
``<unk>`` in its tokenizer.json) as text, where OpenFlamingo's tokenizer (transformers 4.28) dropped
it. A caption or answer that contains one scores differently from the reference. The ids of every
special token are therefore removed before decoding, which is exactly what the reference's decoder
did (it skipped them and decoded the rest).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids of every special token of ``tokenizer``: bos, eos, unk, pad and the added Flamingo tokens."""
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special)
    return frozenset(int(i) for i in ids if i is not None)


def _rows(token_ids) -> list[list[int]]:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    return [list(row) for row in token_ids]


def decode_texts(tokenizer, token_ids: torch.Tensor | Sequence[Iterable[int]]) -> list[str]:
    """One string per row of ``token_ids``, without the text of any special token."""
    special = special_token_ids(tokenizer)
    rows = [[int(t) for t in row if int(t) not in special] for row in _rows(token_ids)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def decode_text(tokenizer, token_ids: torch.Tensor | Iterable[int]) -> str:
    """:func:`decode_texts` of a single sequence."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.flatten().tolist()
    return decode_texts(tokenizer, [list(token_ids)])[0]

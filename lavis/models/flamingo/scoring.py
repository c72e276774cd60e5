"""Log-likelihood scoring of continuations with the context (and its media) encoded once.

The v2 evaluation ranks class names by their log-likelihood after a few-shot context (ImageNet, Hateful
Memes). Scoring every (context, continuation) pair from scratch re-encodes the images and re-runs the
context for each candidate; here the context runs once with a KV cache, and the continuations are fed in
batches on top of copies of that cache (each row's cache repeated once per continuation of the batch).
The result equals scoring each continuation from scratch (tests/test_flamingo_scoring.py) because the LM
uses ``arange`` positions, which continue across the cache, and because the v2 media index continues
from the cached ``<image>`` count, so continuation tokens attend the context's last image as a plain
forward over context + continuation would.

Unlike the reference (``attention_mask=None`` on the continuation steps), the context's padding stays
masked, so left-padded rows score what they would score unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lavis.common.errors import DataError
from lavis.models.inference_mode import inference_method


def _check(
    model, lang_x: torch.Tensor, attention_mask: torch.Tensor | None, continuations: Sequence[Sequence[int]]
) -> None:
    if not continuations:
        raise DataError("score: no continuations given")
    for i, cont in enumerate(continuations):
        if len(cont) == 0:
            raise DataError(f"score: continuation {i} is empty")
        if model.media_token_id in cont:
            raise DataError(f"score: continuation {i} contains <image>; media belong in the context")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise DataError(
            "score: the context must be left-padded (its last position is padding in some row), "
            "so that every row's last token predicts the first continuation token"
        )


def _padded(continuations: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, K) right-padded ids and (C,) lengths."""
    lengths = torch.tensor([len(c) for c in continuations], device=device)
    ids = torch.full((len(continuations), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for i, cont in enumerate(continuations):
        ids[i, : len(cont)] = torch.as_tensor(list(cont), dtype=torch.long, device=device)
    return ids, lengths


@inference_method
def score_continuations(
    model,
    vision_x: torch.Tensor,
    lang_x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    continuations: Sequence[Sequence[int]],
    normalize_length: bool = True,
    batch_size: int = 16,
) -> torch.Tensor:
    """Log-likelihood of each continuation after each row's context: a float32 tensor (B, C).

    ``continuations`` are token-id lists appended after every row of ``lang_x`` (left-padded contexts,
    B rows, with their images in ``vision_x``). Returns the mean log-probability per continuation token
    when ``normalize_length`` (the v2 classification score), else the sum. ``batch_size`` continuations
    share one forward over the cached context.
    """
    _check(model, lang_x, attention_mask, continuations)
    counts = model._check_media_tokens(vision_x, lang_x)
    b = lang_x.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(lang_x)
    pad_id = model.pad_token_id if model.pad_token_id is not None else 0
    cont_ids, lengths = _padded(continuations, pad_id, lang_x.device)
    num = len(continuations)
    per_batch = max(1, min(int(batch_size), num))
    # Pad the continuation list to whole batches (repeating the last one) so that the cache is expanded
    # once and every batch has the same shape; the extra rows are dropped.
    n_batches = -(-num // per_batch)
    fill = n_batches * per_batch - num
    if fill:
        cont_ids = torch.cat([cont_ids, cont_ids[-1:].expand(fill, -1)])
        lengths = torch.cat([lengths, lengths[-1:].expand(fill)])

    media = model.encode_vision(vision_x, counts)
    scores = []
    with model.conditioned_on(media):
        out = model.lang_encoder(input_ids=lang_x, attention_mask=attention_mask, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): predicts each continuation's first token
        cache.batch_repeat_interleave(per_batch)
        context_mask = attention_mask.repeat_interleave(per_batch, dim=0)
        for start in range(0, n_batches * per_batch, per_batch):
            ids = cont_ids[start : start + per_batch]  # (c, K)
            lens = lengths[start : start + per_batch]
            k = ids.shape[1]
            rows = ids.repeat(b, 1)  # row b * c + j = continuation j after context b
            cont_mask = (torch.arange(k, device=ids.device)[None, :] < lens[:, None]).long().repeat(b, 1)
            step = model.lang_encoder(
                input_ids=rows, attention_mask=torch.cat([context_mask, cont_mask], 1), cache=cache, use_cache=True
            )
            cache.crop(-k)  # back to the context alone for the next batch
            logp = step.logits[:, :-1].float().log_softmax(-1)  # position j predicts token j + 1
            later = logp.gather(-1, rows[:, 1:, None]).squeeze(-1) * cont_mask[:, 1:]
            head = first.repeat_interleave(per_batch, dim=0).gather(-1, rows[:, :1]).squeeze(-1)
            total = (head + later.sum(-1)).view(b, per_batch)
            scores.append(total / lens[None, :] if normalize_length else total)
    return torch.cat(scores, dim=1)[:, :num]

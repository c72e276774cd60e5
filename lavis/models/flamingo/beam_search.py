"""Beam search as HF ``generate(num_beams > 1)`` runs it, without HF's per-step machinery.

HF's vectorised beam search (transformers 5) rebuilds its model inputs, runs its logits processors and
stopping criteria and reorders its cache through several layers of calls at every step; on a small LM
that bookkeeping costs as much as the forward itself. :func:`beam_search` is the same search, step for
step and in the same tensor operations (so that ties between equal scores break the same way):

- each step keeps the ``max(2, 1 + n_eos) * num_beams`` best continuations of every sample over all its
  beams (accumulated log-probabilities, eos masked until ``min_new_tokens``);
- a continuation that ends in eos, or reaches ``max_new_tokens``, is a finished hypothesis when it
  ranks among the ``num_beams`` best; its score is divided by ``length ** length_penalty`` and the
  ``num_beams`` best finished hypotheses are kept;
- the best ``num_beams`` unfinished continuations run on;
- a sample stops taking hypotheses once its best running beam can no longer beat its worst finished
  one (HF's heuristic for ``early_stopping``: False, True or "never").

Only the settings listed in :data:`SUPPORTED` are implemented; :meth:`BeamSettings.of` says None for
anything else (sampling, other logits processors, an LM generation config with its own decoding
defaults), and the caller then runs HF's own ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

# GenerationConfig fields this search implements (any other field set away from its default -> HF).
SUPPORTED = frozenset(
    {
        "num_beams",
        "max_new_tokens",
        "min_new_tokens",
        "length_penalty",
        "early_stopping",
        "num_return_sequences",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "use_cache",
        "do_sample",
        "transformers_version",
    }
)
# Fields of an LM's own generation config that HF merges into ours only where they change nothing here.
_LM_DEFAULTS_IGNORED = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "_from_model_config",
        "transformers_version",
        "output_attentions",
        "output_hidden_states",
    }
)
_MASKED = -1.0e9  # the score HF gives to slots that must not be chosen


@dataclass(frozen=True)
class BeamSettings:
    """The decoding settings of one beam search (see the module docstring)."""

    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    eos_token_ids: tuple[int, ...]
    fill_token_id: int  # what HF writes after a hypothesis ends (its pad id, else its first eos)

    @classmethod
    def of(cls, config: GenerationConfig, lm_config: GenerationConfig | None) -> BeamSettings | None:
        """The settings of ``config`` when this search implements them exactly, else None (use HF).

        ``lm_config`` is the LM's own generation config: HF fills our unset fields from it, so one
        that sets any decoding field (a repetition penalty, a forced eos, ...) goes to HF as well.
        """
        if lm_config is not None:
            if any(key not in _LM_DEFAULTS_IGNORED for key in lm_config.to_diff_dict()):
                return None
            if lm_config.output_attentions or lm_config.output_hidden_states:
                return None
        if any(key not in SUPPORTED for key in config.to_diff_dict()):
            return None
        # Unset fields (None) take HF's global defaults, as generate resolves them.
        beams, returned = config.num_beams or 1, config.num_return_sequences or 1
        eos = config.eos_token_id
        if beams < 2 or config.do_sample or config.use_cache is False or not config.max_new_tokens:
            return None
        if eos is None or returned > beams:
            return None
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
        pad = config.pad_token_id
        return cls(
            num_beams=beams,
            max_new_tokens=int(config.max_new_tokens),
            min_new_tokens=int(config.min_new_tokens or 0),
            length_penalty=1.0 if config.length_penalty is None else float(config.length_penalty),
            early_stopping=config.early_stopping or False,
            num_return_sequences=returned,
            eos_token_ids=eos_ids,
            fill_token_id=int(pad) if pad else eos_ids[0],  # HF: `pad or eos[0]` (a pad id of 0 counts as unset)
        )


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B, N, ...) -> (B, k, ...) at ``index`` (B, k) along the beam axis."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(
    step: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], batch: int, settings: BeamSettings
) -> torch.Tensor:
    """New tokens (batch * num_return_sequences, n) of the best hypotheses, best first within a sample.

    ``step(tokens, beam_rows)`` runs the LM on one token per row (B * num_beams rows, beams of a sample
    adjacent) after reordering its cache so that row r continues row ``beam_rows[r]``, and returns the
    next-token logits (B * num_beams, V). The first call gets ``tokens=None, beam_rows=None`` and returns
    the logits after the prompt. Positions after a hypothesis ends hold ``settings.fill_token_id``.
    """
    s, b, k = settings, batch, settings.num_beams
    logits = step(None, None)
    device = logits.device
    keep = max(2, 1 + len(s.eos_token_ids)) * k
    eos = torch.tensor(s.eos_token_ids, device=device)
    is_top = torch.arange(keep, device=device) < k  # only the k best continuations may finish
    running = torch.full((b, k, s.max_new_tokens), s.fill_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = _MASKED  # only the first beam's tokens at step 0: the beams start identical
    finished, finished_scores = running.clone(), torch.full((b, k), _MASKED, device=device)
    finished_lengths = torch.zeros(b, k, dtype=torch.long, device=device)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    offsets = torch.arange(b, device=device)[:, None] * k
    for t in range(s.max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if t < s.min_new_tokens:
            log_probs[:, eos] = -float("inf")
        vocab = log_probs.shape[-1]
        scores = (log_probs.view(b, k, vocab) + running_scores[:, :, None]).reshape(b, -1)
        top_scores, top_index = torch.topk(scores, k=keep)
        source = top_index // vocab
        candidates = _gather(running, source)
        candidates[:, :, t] = top_index % vocab
        ends = torch.isin(candidates[:, :, t], eos) | (t + 1 >= s.max_new_tokens)

        # The best unfinished continuations run on.
        open_scores = top_scores + ends.to(torch.float32) * _MASKED
        chosen = torch.topk(open_scores, k=k)[1]
        running, running_scores = _gather(candidates, chosen), _gather(open_scores, chosen)
        beam_rows = (_gather(source, chosen) + offsets).flatten()

        # The best finished hypotheses so far (HF's order of additions, for identical rounding). A step
        # where no top continuation ends adds none: every candidate then has a masked score, at most
        # the kept ones' (a tie only with a slot still unfilled, which is never returned, as a sample
        # stops only once its slots are all filled), so the merge is skipped.
        just_finished = ends & is_top[None, :]
        if bool(just_finished.any()):
            done_scores = top_scores / ((t + 1) ** s.length_penalty)
            all_done = is_finished.all(dim=-1, keepdim=True) & (s.early_stopping is True)
            done_scores += all_done.to(torch.float32) * _MASKED
            done_scores += (~improvable).to(torch.float32) * _MASKED
            done_scores += (~just_finished) * _MASKED
            merged_scores = torch.cat((finished_scores, done_scores), dim=1)
            best = torch.topk(merged_scores, k=k)[1]
            finished = _gather(torch.cat((finished, candidates), dim=1), best)
            finished_scores = _gather(merged_scores, best)
            lengths = torch.cat((finished_lengths, torch.full_like(candidates[:, :, 0], t + 1)), 1)
            finished_lengths = _gather(lengths, best)
            is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

        # HF's heuristic: can the best running beam still beat the worst kept hypothesis?
        best_length = s.max_new_tokens if (s.early_stopping == "never" and s.length_penalty > 0.0) else t + 1
        best_possible = running_scores[:, :1] / (best_length**s.length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _MASKED)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        # One host sync per step: stop when no sample can improve, every kept hypothesis is final
        # (early_stopping True) or every continuation ended (the last step).
        all_final = is_finished.all() & (s.early_stopping is True)
        if not bool(improvable.any() & ~all_final & ~ends.all()):
            break
        logits = step(running[:, :, t].flatten(), beam_rows)
    returned = s.num_return_sequences
    length = int(finished_lengths[:, :returned].max())
    return finished[:, :returned, :length].reshape(b * returned, length)

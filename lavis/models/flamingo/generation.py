"""Flamingo's generation: the media encoded once, the prompt run once per sample, our beam search over a
KV cache reserved once per call (HF's ``generate`` for the settings it does not implement).

:class:`FlamingoGeneration` is the decoding half of :class:`~lavis.models.flamingo.flamingo.Flamingo`,
which it is mixed into: it uses the network's ``encode_vision``, ``conditioned_on`` and ``_index_call``.
``beam_settings`` and ``reserved_cache`` are looked up here at each call, so a benchmark can put HF's
own search and cache in their place (benchmarks/fewshot_eval.py's reference).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig

from lavis.models.flamingo.beam_search import BeamSettings, beam_search
from lavis.models.flamingo.cross_attention import media_index
from lavis.models.flamingo.kv_cache import ReservedCache, reserved_cache
from lavis.models.flamingo.language_models import family_of_model
from lavis.models.flamingo.shared_prompt import share_prompt, shared_prompt_attention
from lavis.models.inference_mode import inference_method


def beam_settings(config: GenerationConfig, lm_config: GenerationConfig | None) -> BeamSettings | None:
    """The settings of our own beam search for ``config``, or None where HF's ``generate`` runs instead."""
    return BeamSettings.of(config, lm_config)


def pad_after_eos(tokens: torch.Tensor, eos_token_id, pad_token_id: int | None) -> torch.Tensor:
    """Replace everything after each row's first eos by ``pad_token_id`` (HF beam search repeats the eos)."""
    if pad_token_id is None or eos_token_id is None:
        return tokens
    eos = torch.as_tensor(eos_token_id, device=tokens.device).flatten()
    is_eos = torch.isin(tokens, eos)
    after_eos = (is_eos.cumsum(dim=-1) - is_eos.long()) > 0
    return tokens.masked_fill(after_eos, pad_token_id)


class FlamingoGeneration:
    """``generate`` and what it is made of; see the module docstring."""

    @inference_method
    def generate(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """HF generation with the KV cache; returns only the NEW tokens, (B * num_return_sequences, N_new).

        Media are encoded once per call and shared by all decoding steps and beams. Defaults are the
        release's: greedy, ``eos_token_id`` = ``<|endofchunk|>``, no sampling, ``length_penalty=1``.
        Rows that ended early are padded with ``pad_token_id`` (default: the tokenizer's pad id).
        Any ``GenerationConfig`` field may be given (num_beams, max_new_tokens, min_new_tokens,
        do_sample, temperature, top_k, top_p, length_penalty, num_return_sequences, use_cache, ...).
        """
        counts = self._check_media_tokens(vision_x, lang_x)
        # use_cache explicit: an LM config with use_cache false (MPT-7B's) must not turn the cache off here.
        settings = {
            "max_new_tokens": 20,
            "num_beams": 1,
            "do_sample": False,
            "early_stopping": False,
            "use_cache": True,
            "length_penalty": 1.0,
            "eos_token_id": self.eoc_token_id,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": None,
        }
        settings.update(generation_kwargs)
        if not settings.get("do_sample"):
            # Sampling knobs the LM's own generation config may carry would only raise warnings.
            settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_k", "top_p")}
        config = GenerationConfig(**settings)
        media = self.encode_vision(vision_x, counts)
        search = beam_settings(config, self.lang_encoder.generation_config)
        if search is not None:
            with self.conditioned_on(media):
                new = self._beam_search(lang_x, attention_mask, search)
            return pad_after_eos(new, config.eos_token_id, config.pad_token_id)
        with self.conditioned_on(media):
            extra = {}
            if config.use_cache is not False:
                cache = reserved_cache(self.lang_encoder.config, lang_x.shape[1] + (config.max_new_tokens or 0))
                if isinstance(cache, ReservedCache):  # HF's beam search reorders through the cache
                    cache.after_reorder = self._follow_beams
                expand = max(config.num_beams or 1, config.num_return_sequences or 1)
                if expand > 1 and lang_x.shape[1] > 1:
                    self._prefill_once(lang_x, attention_mask, expand, cache)
                extra["cache"] = cache
            out = self.lang_encoder.generate(
                input_ids=lang_x, attention_mask=attention_mask, generation_config=config, **extra
            )
        return pad_after_eos(out[:, lang_x.shape[1] :], config.eos_token_id, config.pad_token_id)

    def _beam_search(self, lang_x: torch.Tensor, attention_mask: torch.Tensor | None, search: BeamSettings):
        """:func:`beam_search` over the LM with a reserved KV cache: the new tokens (B * returned, n).

        The whole prompt runs once per sample (HF runs it once per beam row) and its last logits are the
        first step's of every beam. Every later LM call gets what HF's generation loop would pass (the
        last token, the mask of all tokens so far, its position from that mask where the family takes
        positions, the cache), except that for LLaMA the cache holds the prompt once per sample and the
        mask is its 4-d one (lavis.models.flamingo.shared_prompt): the logits are HF's up to float rounding.
        """
        lm, beams = self.lang_encoder, search.num_beams
        rows, length = lang_x.shape[0] * beams, lang_x.shape[1]
        cache = reserved_cache(lm.config, length + search.max_new_tokens)
        family = family_of_model(lm)
        fast = family.decoding_step(lm, length + search.max_new_tokens)
        mask = torch.ones_like(lang_x) if attention_mask is None else attention_mask
        # The whole prompt once per sample (HF runs it once per beam row: identical rows); its last
        # position's logits are the first step's of every beam.
        prompt_logits = self._prompt_pass(lang_x, attention_mask, cache)
        # The prompt once per sample for all beams needs our decoding step (it passes the 4-d mask).
        shared = None if fast is None else share_prompt(cache, beams, mask, lm.config)
        if shared is None:
            cache.batch_repeat_interleave(beams)
            full_mask = torch.ones(rows, length + search.max_new_tokens, dtype=mask.dtype, device=mask.device)
            full_mask[:, :length] = mask.repeat_interleave(beams, dim=0)
        # HF's positions: mask cumsum - 1 at the last prompt token, then one more per new token.
        last = mask.long().sum(-1, keepdim=True).repeat_interleave(beams, dim=0) - 1
        state = {"length": length}

        def step(tokens: torch.Tensor | None, beam_rows: torch.Tensor | None) -> torch.Tensor:
            if tokens is None:
                return prompt_logits.repeat_interleave(beams, dim=0)
            if shared is None:
                cache.reorder_cache(beam_rows)
            else:
                shared.reorder(beam_rows)
            self._follow_beams(beam_rows)
            state["length"] += 1
            tokens, new = tokens[:, None], state["length"] - length
            if fast is not None:
                self._index_call(tokens, cache)  # the decoder pre-hook's work, which fast skips
                if shared is None:
                    return fast(tokens, full_mask[:, : state["length"]], last + new, cache)
                return fast(tokens, shared.next_mask(), last + new, cache)
            extra = {"position_ids": last + new} if family.takes_position_ids else {}
            out = lm(
                input_ids=tokens,
                attention_mask=full_mask[:, : state["length"]],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
            return out.logits[:, -1]

        with contextlib.nullcontext() if shared is None else shared_prompt_attention(lm):
            return beam_search(step, lang_x.shape[0], search)

    def _follow_beams(self, beam_rows: torch.Tensor) -> None:
        """After a beam reorder (row r continues row ``beam_rows[r]``): under v2, row r has seen the
        ``<image>`` tokens of the row it continues, generated ones included."""
        cond = self._cond
        if cond.media_count is not None and cond.media_count.shape[0] == beam_rows.shape[0]:
            cond.media_count = cond.media_count.index_select(0, beam_rows.to(cond.media_count.device))

    def _prefill_once(self, lang_x: torch.Tensor, attention_mask: torch.Tensor | None, expand: int, cache) -> None:
        """Fill ``cache`` with every prompt token but the last, computed once per sample, repeated per beam.

        HF generation would run the prompt once per beam row (identical rows); here the prefix runs on
        the B samples, its cache is repeated ``expand`` times, and HF's generation feeds only the last
        prompt token.
        """
        self._prompt_pass(lang_x, attention_mask, cache, end=-1)
        cache.batch_repeat_interleave(expand)

    def _prompt_pass(
        self, lang_x: torch.Tensor, attention_mask: torch.Tensor | None, cache, end: int | None = None
    ) -> torch.Tensor:
        """Run the prompt's tokens ``[:end]`` into ``cache`` (B rows); the logits of the last one run (B, V).

        Positions follow HF's rule (mask cumsum - 1, pads 0), and every token gets the media index of the
        whole prompt, so the prompt is computed as in one call of all its tokens.
        """
        mask = torch.ones_like(lang_x) if attention_mask is None else attention_mask
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if end is not None:  # the rest of the prompt comes in a later call
            self._cond.prompt_index = media_index(lang_x, self.media_token_id, self.xattn_semantics)
        out = self.lang_encoder(
            input_ids=lang_x[:, :end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, :end],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

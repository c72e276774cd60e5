"""LLaMA (OpenFlamingo-9B v1): native LlamaForCausalLM, untied head that the release checkpoint omits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lavis.models.flamingo.language_models.base import DecodingStep, LanguageModelFamily


class RotaryTable:
    """A static rotary embedding's cos/sin, computed once for positions ``0 .. size - 1`` and looked up per call.

    HF's rotary module recomputes cos/sin of every position at every decoding call (about ten operations).
    Each position's values are elementwise in it, so a row of the table equals that call's, bit for bit.
    Only for rotary types whose frequencies never change: HF rescales "dynamic" and "longrope" ones as
    the positions grow.
    """

    def __init__(self, rotary: nn.Module, size: int):
        self.rotary, self.size = rotary, size
        self.cos = self.sin = None

    @staticmethod
    def applies(rotary: nn.Module) -> bool:
        rope_type = rotary.rope_type
        return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None:
            positions = torch.arange(self.size, device=hidden.device)[None]
            cos, sin = self.rotary(hidden, position_ids=positions)
            self.cos, self.sin = cos[0], sin[0]
        return F.embedding(position_ids, self.cos), F.embedding(position_ids, self.sin)


class LlamaFamily(LanguageModelFamily):
    """LLaMA, with a decoding step that calls the decoder layers directly.

    A decoding call of one token per row spends about a third of a small LLaMA's time in the forward's
    wrappers (argument merging, output capture, ``create_causal_mask``); the step below computes what
    ``LlamaForCausalLM.forward`` does for such a call with the same modules and tensors, so its logits
    are the forward's, bit for bit (tests/test_beam_search.py compares the tokens with HF generation).
    It also takes a shared-prompt cache's 4-d mask (lavis.models.flamingo.shared_prompt), which the
    forward cannot.
    """

    def decoding_step(self, lm: nn.Module, max_positions: int) -> DecodingStep | None:
        # The mask below is what create_causal_mask builds for SDPA; other attention kernels take others.
        if lm.config._attn_implementation != "sdpa":
            return None
        decoder, head = self.decoder(lm), lm.get_output_embeddings()
        layers = decoder.layers[: lm.config.num_hidden_layers]
        # HF's rotary module itself where its frequencies change with the positions.
        rotary = decoder.rotary_emb
        if RotaryTable.applies(rotary):
            rotary = RotaryTable(rotary, max_positions)

        def step(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
            hidden = decoder.embed_tokens(input_ids)
            # A one-token query may see every cached position but the padded ones; with none padded,
            # create_causal_mask returns no mask at all (and SDPA then runs unmasked). A 4-d mask is
            # already SDPA's (a shared-prompt cache's, lavis.models.flamingo.shared_prompt).
            if attention_mask.dim() == 4:
                mask = attention_mask
            else:
                mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
            position_embeddings = rotary(hidden, position_ids)
            for layer in layers:
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                )
            return head(decoder.norm(hidden))[:, -1]

        return step


LLAMA = LlamaFamily(
    name="llama",
    layers_path="model.layers",
    lora_target_modules=("q_proj", "v_proj"),
    checkpoint_carries_head=False,
    description="LLaMA (OpenFlamingo-9B v1, LlamaForCausalLM)",
)

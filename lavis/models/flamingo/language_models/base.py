"""One small interface over the language-model families OpenFlamingo was released with.

A family says where the decoder layers are, whether the output head is tied to the input embeddings,
how its LM directory is loaded (natively; remote code is never run), which names a release
``checkpoint.pt`` uses for its tensors, which tensors such a checkpoint must carry, and which modules
LoRA targets by default. Rows the checkpoint does not carry (the added tokens of an untied head, say)
are initialised from a seed in the config, never from the process's RNG state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# (input_ids (B, 1), attention_mask (B, cached + 1), position_ids (B, 1), cache) -> last-position logits (B, V);
# with a shared-prompt cache (lavis.models.flamingo.shared_prompt) the mask is its 4-d SDPA mask.
DecodingStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class LanguageModelFamily:
    """What Flamingo needs to know about one LM family (see the module docstring)."""

    name: str  # our name, and the config.json model_type that selects the family
    layers_path: str  # module path of the decoder layer list inside the causal LM
    lora_target_modules: tuple[str, ...]  # default LoRA targets in the LM (attention + MLP projections)
    # Release checkpoint names (relative to lang_encoder.) that differ from ours, e.g. GPT-NeoX's embed_out.
    checkpoint_renames: dict[str, str] = field(default_factory=dict)
    # Whether a release checkpoint carries the (untied) output head: v2 GPT-NeoX keeps embed_out by its
    # "embed" rule; the v1 LLaMA release does not (its head rows of the added tokens are random).
    checkpoint_carries_head: bool = False
    # A transformers attention implementation the family's LMs run with (None = transformers' default):
    # GPT-NeoX's computes in the order of the transformers release the v2 checkpoints were made with.
    attention_implementation: str | None = None
    # Whether the LM's forward takes position ids: HF generation then passes them, computed from the
    # attention mask (rotary LMs: LLaMA, GPT-NeoX); ALiBi LMs (MPT) take none.
    takes_position_ids: bool = True
    description: str = ""  # for error messages: which releases use the family

    def decoder_layers(self, lm: nn.Module) -> nn.ModuleList:
        """The decoder layer list of ``lm``."""
        return lm.get_submodule(self.layers_path)

    def decoder(self, lm: nn.Module) -> nn.Module:
        """The decoder stack whose forward sees each call's ``input_ids`` (where Flamingo hooks in)."""
        return lm.get_decoder()

    def decoding_step(self, lm: nn.Module, max_positions: int) -> DecodingStep | None:
        """A function computing one cached decoding call of ``lm`` without its forward's wrappers, or None.

        None (the default): the caller runs the LM's forward. A family returns a function only where it
        computes exactly what that forward would (same logits), for the LM as it is configured now, at
        positions below ``max_positions``. The function does not run the decoder stack's forward
        pre-hooks: the caller does their work first.
        """
        return None

    def is_tied(self, lm: nn.Module) -> bool:
        """True when the output head shares the input embedding matrix."""
        head = lm.get_output_embeddings()
        return head is None or head.weight is lm.get_input_embeddings().weight

    def checkpoint_required(self, lm: nn.Module) -> list[str]:
        """LM parameter names (relative to lang_encoder.) a Flamingo checkpoint of this family must carry."""
        names = {id(p): n for n, p in lm.named_parameters()}
        required = [names[id(lm.get_input_embeddings().weight)]]
        if self.checkpoint_carries_head and not self.is_tied(lm):
            required.append(names[id(lm.get_output_embeddings().weight)])
        return required

    def checkpoint_name(self, key: str) -> str:
        """Our name (relative to lang_encoder.) for a release key relative to lang_encoder."""
        return self.checkpoint_renames.get(key, key)

    def prepare(self, lm: nn.Module) -> None:
        """Family settings on a built LM (loaded or tiny): its attention implementation."""
        if self.attention_implementation is not None:
            lm.set_attn_implementation(self.attention_implementation)

    def load(self, path: str, dtype: torch.dtype, quantization) -> nn.Module:
        """The causal LM of a local directory, natively (see lavis.models.language_model.load_language_model)."""
        from lavis.models.language_model import load_language_model

        return load_language_model(path, dtype, quantization)

    def resize_embeddings(self, lm: nn.Module, num_tokens: int, seed: int) -> None:
        """Resize input (and untied output) embeddings to ``num_tokens`` rows.

        Shrinking keeps the first rows (what the v2 releases did: 50432 -> 50280). Growing draws the new
        rows from N(0, initializer_range^2) with a generator seeded by ``seed``, so they depend on the
        config alone; a checkpoint that carries the matrices overrides them anyway.
        """
        old = lm.get_input_embeddings().weight.shape[0]
        if old == num_tokens:
            return
        lm.resize_token_embeddings(num_tokens, mean_resizing=False)
        if num_tokens < old:
            return
        std = float(getattr(lm.config, "initializer_range", 0.02))
        generator = torch.Generator().manual_seed(int(seed))
        mats = [lm.get_input_embeddings().weight]
        if not self.is_tied(lm):
            mats.append(lm.get_output_embeddings().weight)
        with torch.no_grad():
            for weight in mats:
                if weight.device.type == "meta":
                    continue
                rows = torch.randn(num_tokens - old, weight.shape[1], generator=generator) * std
                weight[old:] = rows.to(weight.dtype)

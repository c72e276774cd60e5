"""The Flamingo network: frozen vision tower -> Perceiver -> gated cross-attention inside a causal LM.

The HF language model keeps its own module tree and names (``lang_encoder.model.layers.<i>.self_attn``
...), so a peft adapter saved from it loads onto a plain LLaMA. The cross-attention blocks live in
``gated_cross_attn_layers[str(i)]`` and run through forward pre-hooks on decoder layer ``i``: the block
transforms the hidden states right before the decoder layer, as OpenFlamingo's ``FlamingoLayer`` did.
The media (Perceiver latents) and the per-token media index of the current call are held in a small
conditioning object for the duration of one ``forward`` / ``generate`` call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lavis.common.errors import DataError
from lavis.common.special_tokens import IGNORE_INDEX
from lavis.models.base import TrainableModel
from lavis.models.flamingo.cross_attention import GatedCrossAttentionBlock, attends_image, media_index
from lavis.models.flamingo.generation import FlamingoGeneration
from lavis.models.flamingo.language_models import family_of_model
from lavis.models.flamingo.packing import Packing
from lavis.models.flamingo.perceiver import PerceiverResampler
from lavis.models.flamingo.vision import patch_tokens


def decoder_layers(lang_encoder: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM of a supported family (see language_models)."""
    return family_of_model(lang_encoder).decoder_layers(lang_encoder)


@dataclass
class _Conditioning:
    """Media of the current call and what the hooks derive from it."""

    media: torch.Tensor | None = None  # (B, T_img, n_latents, D_vis), as encoded: one row per sample
    index: torch.Tensor | None = None  # (B_lm, L_call) media index of the current LM call
    attends: bool = False  # whether a token of the current call attends an image
    media_count: torch.Tensor | None = None  # (B_lm,) <image> tokens seen so far (v2 with a KV cache)
    prompt_index: torch.Tensor | None = None  # (B, L) media index of a prompt being run in parts
    # Per cross-attention block, the media keys/values: computed at the first LM call, reused by every
    # later one (decoding steps) and shared by the beams of a sample (never repeated per beam).
    kv: dict = field(default_factory=dict)
    # A packed training call: ``index`` is set for the padded rows; the blocks unpack for their attention.
    packing: Packing | None = None

    def set_index(self, index: torch.Tensor) -> None:
        """Set the current call's media index, and whether any token attends an image: decided once per LM
        call (one host sync) rather than by every block, which skips its attention when none does (every
        v1 decoding step)."""
        self.index = index
        self.attends = bool(attends_image(index, self.media.shape[1]).any())


class Flamingo(FlamingoGeneration, TrainableModel):
    """OpenFlamingo: ``forward(vision_x, lang_x, attention_mask, labels)`` and ``generate(...)``.

    ``vision_x`` is float (B, T_img, F=1, C, H, W); images of a row are stacked in the order of its
    ``<image>`` tokens. ``xattn_semantics`` picks the media masking ("v1" = the OpenFlamingo-9B release,
    "v2" = the Flamingo paper); see :mod:`lavis.models.flamingo.cross_attention`.
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_encoder: nn.Module,
        *,
        vis_dim: int,
        media_token_id: int,
        eoc_token_id: int,
        pad_token_id: int | None,
        cross_attn_every_n_layers: int = 4,
        perceiver: dict | None = None,
        cross_attention: dict | None = None,
        xattn_semantics: str = "v2",
    ):
        super().__init__()
        if xattn_semantics not in ("v1", "v2"):
            raise ValueError(f"xattn_semantics must be 'v1' or 'v2', got {xattn_semantics!r}")
        self.vision_encoder = vision_encoder.requires_grad_(False).eval()
        self.perceiver = PerceiverResampler(vis_dim, **(perceiver or {}))
        self.lang_encoder = lang_encoder
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        self.pad_token_id = pad_token_id
        self.xattn_semantics = xattn_semantics
        self.gradient_checkpointing = False
        layers = decoder_layers(lang_encoder)
        lm_dim = lang_encoder.config.hidden_size
        every = int(cross_attn_every_n_layers)
        self.gated_cross_attn_layers = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(lm_dim, vis_dim, **(cross_attention or {}))
                for i in range(len(layers))
                if (i + 1) % every == 0
            }
        )
        self._cond = _Conditioning()
        self.media_cache = None  # a MediaCache while media_cache_enabled(...) is active
        # Hooks are on the HF modules themselves, so they survive peft wrapping of lang_encoder.
        family = family_of_model(lang_encoder)
        family.decoder(lang_encoder).register_forward_pre_hook(self._on_lm_call, with_kwargs=True)
        for name in self.gated_cross_attn_layers:
            layers[int(name)].register_forward_pre_hook(self._xattn_hook(name), with_kwargs=True)

    # ------------------------------------------------------------------ conditioning
    def train(self, mode: bool = True):
        """Train mode everywhere except the frozen vision tower (no dropout / BN updates there)."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def encode_vision(self, vision_x: torch.Tensor, media_counts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T_img, F, C, H, W) -> Perceiver latents (B, T_img, n_latents, D_vis); the tower gets no grad.

        With a :class:`~lavis.models.flamingo.media_cache.MediaCache` enabled and no gradient recorded,
        each distinct image is encoded once and its latents reused (see that module). ``media_counts``
        (B,), the <image> tokens of each row: a row's slots past its count are padding (a batch of
        samples with 1..T images) that no token can attend, so they are not encoded and their latents
        are zeros: the same outputs and gradients (a masked latent gets exactly zero weight) for less
        work. With no image in the batch at all everything is encoded, so every Perceiver parameter
        still takes part in the step (as DDP and FSDP expect).
        """
        if vision_x.ndim != 6:
            raise DataError(f"vision_x must be (batch, images, frames, C, H, W), got shape {tuple(vision_x.shape)}")
        if self.media_cache is not None and not torch.is_grad_enabled():
            return self.media_cache.encode(vision_x, self._encode_images)
        if media_counts is not None:
            b, t = vision_x.shape[:2]
            real = torch.arange(t, device=media_counts.device) < media_counts[:, None]
            if bool(real.any()) and not bool(real.all()):
                latents = self._encode_images(vision_x[real][:, None])[:, 0]  # (N_real, n, D)
                return latents.new_zeros(b, t, *latents.shape[1:]).index_put((real,), latents)
        return self._encode_images(vision_x)

    def _encode_images(self, vision_x: torch.Tensor) -> torch.Tensor:
        b, t, f = vision_x.shape[:3]
        images = vision_x.reshape(b * t * f, *vision_x.shape[3:])
        with torch.no_grad():
            tokens = patch_tokens(self.vision_encoder, images)
        tokens = tokens.reshape(b, t, f, *tokens.shape[1:]).to(self.perceiver.latents.dtype)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.perceiver, tokens, use_reentrant=False)
        return self.perceiver(tokens)

    def _check_media_tokens(self, vision_x: torch.Tensor, lang_x: torch.Tensor) -> torch.Tensor:
        """The <image> tokens of each row (B,), after checking that ``vision_x`` holds that many images."""
        counts = (lang_x == self.media_token_id).sum(dim=-1)
        if vision_x.shape[0] != lang_x.shape[0]:
            raise DataError(f"vision_x has {vision_x.shape[0]} rows but lang_x has {lang_x.shape[0]}")
        too_many = (counts > vision_x.shape[1]).nonzero().flatten().tolist()
        if too_many:
            row = too_many[0]
            raise DataError(
                f"row {row} of lang_x has {int(counts[row])} <image> tokens but vision_x holds only "
                f"{vision_x.shape[1]} images per row"
            )
        return counts

    @contextlib.contextmanager
    def conditioned_on(self, media: torch.Tensor):
        """Within the block, LM calls cross-attend to ``media`` (B, T_img, n, D) (encoded once)."""
        self._cond = _Conditioning(media=media)
        try:
            yield
        finally:
            self._cond = _Conditioning()

    def _on_lm_call(self, module, args, kwargs):
        """Pre-hook of the decoder stack: compute the media index of this call's tokens."""
        cond = self._cond
        if cond.media is None or cond.packing is not None:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("Flamingo needs input_ids (not inputs_embeds) to place the media")
        self._index_call(input_ids, kwargs.get("cache", kwargs.get("past_key_values")))
        return None

    def _index_call(self, input_ids: torch.Tensor, cache) -> None:
        """Set the media index of an LM call's tokens (``cache``: the call's KV cache, or None)."""
        cond = self._cond
        rows = input_ids.shape[0]
        if rows % cond.media.shape[0]:
            # Beams / returned sequences of one sample are adjacent rows (HF repeat_interleave); the
            # cross-attention maps LM row r to media row r // (rows / media rows).
            raise ValueError(f"LM batch {rows} is not a multiple of the media batch {cond.media.shape[0]}")
        past_len = cache.get_seq_length() if cache is not None else 0
        past_count = cond.media_count if (past_len > 0 and cond.media_count is not None) else None
        if past_count is not None and past_count.shape[0] != rows:  # the prompt was run once per sample
            past_count = past_count.repeat_interleave(rows // past_count.shape[0], dim=0)
        if cond.prompt_index is not None:
            # A prompt run in parts (HF generate: a once-per-sample prefix, then its last token in the
            # first decoding call): every part gets the media index of the whole prompt, as in one call.
            part = cond.prompt_index[:, past_len : past_len + input_ids.shape[1]]
            cond.set_index(part.repeat_interleave(rows // part.shape[0], dim=0))
            if past_len + input_ids.shape[1] >= cond.prompt_index.shape[1]:
                cond.prompt_index = None
        else:
            cond.set_index(media_index(input_ids, self.media_token_id, self.xattn_semantics, past_count))
        if self.xattn_semantics == "v2":  # v1 indexes each call from its own ids: no count to carry
            new = (input_ids == self.media_token_id).sum(dim=-1)
            cond.media_count = new if past_count is None else past_count + new

    def _xattn_hook(self, name: str):
        block = self.gated_cross_attn_layers[name]

        def hook(module, args, kwargs):
            cond = self._cond
            if cond.index is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            dtype = block.ff_gate.dtype
            index, kv = (cond.index, cond.kv.get(name)) if cond.attends else (None, None)
            if index is not None and kv is None:
                kv = cond.kv[name] = block.attn.media_kv(cond.media.to(dtype))
            x = hidden.to(dtype)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(block, x, kv, index, cond.packing, use_reentrant=False)
            else:
                out = block(x, kv, index, cond.packing)
            out = out.to(hidden.dtype)
            if args:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}

        return hook

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        loss_only: bool = False,
        **lm_kwargs,
    ):
        """Logits (and ``.loss`` when ``labels``, -100 = ignored) of ``lang_x`` conditioned on ``vision_x``.

        Like the release, no position ids are passed: the LM uses ``arange(L)`` for every row.
        ``loss_only`` (with ``labels``; the training path): the same ``.loss``, but the output head and the
        cross-entropy run only at the positions that predict a label, and the LM only up to the last of
        them; ``.logits`` is then (N_targets, V), the logits of those positions in row-major order. The
        only LM argument it takes is ``num_items_in_batch`` (see :meth:`_loss_at_targets`).
        """
        media = self.encode_vision(vision_x, self._check_media_tokens(vision_x, lang_x))
        with self.conditioned_on(media):
            if loss_only and labels is not None:
                return self._loss_at_targets(lang_x, attention_mask, labels, **lm_kwargs)
            return self.lang_encoder(input_ids=lang_x, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    def _loss_at_targets(
        self,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> CausalLMOutputWithPast:
        """HF's causal-LM loss, computed only where it has terms (called inside ``conditioned_on``).

        Position ``t`` predicts ``labels[:, t + 1]``; only the positions whose next label is not -100 enter
        the loss, so the output head (V x D) and the cross-entropy run on those rows alone. A causal LM's
        position ``t`` influences only positions >= t, so the columns after the last predicting position
        change neither the loss nor any gradient: the decoder runs on the columns before them, and for an
        LM that takes position ids on those columns packed into as few rows as fit (:class:`Packing`: the
        same hidden states without the padding). Reduction as
        HF's ``ForCausalLMLoss``: the sum over the targets divided by ``num_items_in_batch`` when given,
        else their mean (NaN without targets, as HF's); logits are upcast to float32 first, as there.
        """
        lm = self.lang_encoder
        family = family_of_model(lm)
        predicts = labels[:, 1:] != IGNORE_INDEX
        rows, cols = predicts.nonzero(as_tuple=True)
        # Rotary LMs take position ids, so their rows can be packed (lavis.models.flamingo.packing).
        packing = (
            Packing.for_targets(lang_x, attention_mask, predicts, self.pad_token_id)
            if family.takes_position_ids
            else None
        )
        if packing is not None:
            cond = self._cond
            cond.set_index(media_index(lang_x[:, : packing.width], self.media_token_id, self.xattn_semantics))
            cond.packing = packing
            hidden = family.decoder(lm)(
                input_ids=packing.input_ids, position_ids=packing.positions, attention_mask=None, use_cache=False
            )[0][packing.locate(rows, cols)]
        else:
            # Without targets the whole row runs, so that every parameter is used as in the full forward.
            width = int(cols.max()) + 1 if len(cols) else lang_x.shape[1]
            hidden = family.decoder(lm)(
                input_ids=lang_x[:, :width],
                attention_mask=None if attention_mask is None else attention_mask[:, :width],
                use_cache=False,
            )[0][rows, cols]
        logits = lm.get_output_embeddings()(hidden)
        targets = labels[:, 1:][rows, cols]
        if num_items_in_batch is None:
            loss = F.cross_entropy(logits.float(), targets)
        else:
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ------------------------------------------------------------------ training helpers
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute decoder layers, cross-attention blocks and the perceiver in backward instead of storing
        their activations (non-reentrant checkpointing, which FSDP's gather hooks also run under)."""
        self.gradient_checkpointing = enabled
        lm = self.lang_encoder
        if enabled and hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enabled:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(lm, "activation_checkpointing_disable"):
            lm.activation_checkpointing_disable()
        else:
            lm.gradient_checkpointing_disable()

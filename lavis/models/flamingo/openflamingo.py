"""The registered model ``openflamingo``: its config schema and how a config becomes a network."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)

from lavis.common.errors import ConfigError
from lavis.common.registry import registry
from lavis.common.special_tokens import END_OF_CHUNK, MEDIA_TOKEN
from lavis.models import adalora, adapters
from lavis.models.adapter_export import save_adapter
from lavis.models.adapters import AdapterConfig, TrainableConfig
from lavis.models.base import ModelConfig
from lavis.models.flamingo.checkpoint_io import load_openflamingo_checkpoint
from lavis.models.flamingo.flamingo import Flamingo
from lavis.models.flamingo.language_models import family_of_directory, family_of_model
from lavis.models.flamingo.language_models.mosaic_gpt import MosaicGPTConfig, MosaicGPTForCausalLM
from lavis.models.flamingo.scoring import score_continuations
from lavis.models.flamingo.tokenizer import build_tiny_tokenizer, load_tokenizer
from lavis.models.flamingo.vision import build_vision_tower, tiny_vision_tower
from lavis.models.inference import InferenceMixin
from lavis.models.language_model import resolve_dtype
from lavis.models.master_weights import cast_frozen_parameters, upcast_trainable_parameters

logger = logging.getLogger(__name__)

TINY = "tiny"  # value of a path key that selects the in-process tiny component
LLAMA_ENV = "LLAMA_PATH"  # default fallback for lang_encoder_path / tokenizer_path when they are null


@dataclass
class PerceiverConfig:
    """Perceiver resampler sizes (OpenFlamingo defaults)."""

    depth: int = 6  # (attention, feed-forward) layers that refine the latents
    heads: int = 8  # attention heads
    dim_head: int = 64  # width of one attention head (attention width = heads * dim_head)
    num_latents: int = 64  # latents per image: the visual tokens cross-attention sees for each image
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * the vision width


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention block sizes (OpenFlamingo defaults)."""

    heads: int = 8  # attention heads (text queries over the image latents)
    dim_head: int = 64  # width of one attention head (attention width = heads * dim_head)
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * the LM hidden size


@dataclass
class TinyConfig:
    """Sizes of the random-initialised tiny components (used where a path key is ``tiny``)."""

    # Input side of the tiny ViT in pixels (the datasets' vis_processor image_size must match).
    image_size: int = 64
    patch_size: int = 16  # ViT patch side in pixels: (image_size / patch_size)^2 patch tokens per image
    vision_width: int = 64  # ViT width, which is also the Perceiver's width
    vision_layers: int = 2  # ViT transformer layers
    vision_head_width: int = 32  # ViT width per attention head (heads = vision_width / vision_head_width)
    # Family of the tiny LM: llama (v1), mpt (MPT-7B's), gpt_neox (RedPajama's), mosaic_gpt (MPT-1B's).
    lm_family: Literal["llama", "mpt", "gpt_neox", "mosaic_gpt"] = "llama"
    lm_hidden_size: int = 128  # hidden size of the tiny LLaMA
    lm_layers: int = 2  # decoder layers of the tiny LLaMA
    lm_heads: int = 4  # attention (and key/value) heads of the tiny LLaMA; must divide lm_hidden_size
    lm_intermediate_size: int = 344  # MLP width of the tiny LLaMA / GPT-NeoX (MPT's is 4 x lm_hidden_size)
    max_position_embeddings: int = 512  # the tiny LLaMA's max_position_embeddings (prompt + new tokens)
    # Size of the tiny BPE vocabulary with its 256 byte tokens (<|endofchunk|>, <image>, <PAD> come on top).
    tokenizer_vocab_size: int = 640
    seed: int = 0  # the whole tiny build is seeded, so two builds are identical


def _path_key(value: Optional[str], key: str, what: str, env: str | None = None) -> str:
    """A local path from the config (or ``env``), checked to exist; ConfigError naming the key otherwise."""
    if value is None and env:
        value = os.environ.get(env)
    how = f"--options model.{key}=PATH" + (f" or the {env} environment variable" if env else "")
    if value is None:
        raise ConfigError(f"model.{key} is not set: give the {what} ({how})")
    if value != TINY and not Path(value).exists():
        raise ConfigError(f"model.{key}: {what} {value!r} does not exist (set it with {how})")
    return value


def tiny_language_model(tiny: TinyConfig, vocab_size: int, pad_token_id: int | None):
    """A random LM of the tiny sizes and family, float32.

    The output head is tied to the input embeddings: a random, frozen, untied head behind the final
    norm caps the logits' range (about |h| * |w| = sqrt(d) * 0.02 * sqrt(d)), so a random tiny LM could
    never become confident however its other parts train. Tied, training the embeddings trains the head.
    """
    d, layers, heads = tiny.lm_hidden_size, tiny.lm_layers, tiny.lm_heads
    if tiny.lm_family == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=d,
                intermediate_size=tiny.lm_intermediate_size,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                max_position_embeddings=tiny.max_position_embeddings,
                rms_norm_eps=1e-6,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=pad_token_id,
                tie_word_embeddings=True,
            )
        )
    if tiny.lm_family == "gpt_neox":
        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=vocab_size,
                hidden_size=d,
                intermediate_size=tiny.lm_intermediate_size,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                max_position_embeddings=tiny.max_position_embeddings,
                rotary_pct=1.0,
                use_parallel_residual=False,
                hidden_act="gelu",
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=pad_token_id,
                tie_word_embeddings=True,
            )
        )
    config_cls, model_cls = (
        (MptConfig, MptForCausalLM) if tiny.lm_family == "mpt" else (MosaicGPTConfig, MosaicGPTForCausalLM)
    )
    return model_cls(
        config_cls(
            vocab_size=vocab_size,
            d_model=d,
            n_heads=heads,
            n_layers=layers,
            max_seq_len=tiny.max_position_embeddings,
            expansion_ratio=4,
            use_cache=True,
            pad_token_id=pad_token_id,
            tie_word_embeddings=True,
        )
    )


@registry.register_model("openflamingo")
class OpenFlamingo(InferenceMixin, Flamingo):
    """OpenFlamingo built from a config section; has ``.tokenizer``, ``.image_processor``, ``.image_size``."""

    @dataclass
    class Config(ModelConfig):
        """Options of ``model`` (arch ``openflamingo``).

        Path keys (``clip_vision_encoder_path``, ``lang_encoder_path``, ``tokenizer_path``) accept the
        value ``tiny`` for the random in-process component sized by ``tiny``. ``lang_encoder_path`` and
        ``tokenizer_path`` fall back to the environment variable ``lang_encoder_env`` names (``LLAMA_PATH``
        by default) when null. The LM family (llama, mpt, gpt_neox, mosaic_gpt) is read from the LM
        directory's ``config.json``; no remote code is ever run.

        ``xattn_semantics`` (media masking) defaults to ``v2`` (the Flamingo paper: a token attends the
        most recent ``<image>`` at or before it, generated tokens attend the prompt's last image), the
        right choice when training new weights. ``llama7b_vitl14.yaml`` sets ``v1``: the released
        OpenFlamingo-9B was trained and evaluated with v1's "next image" masking and only reproduces
        its numbers with it.
        """

        clip_vision_encoder_path: Optional[str] = None  # open_clip model name or model-config JSON path
        clip_vision_encoder_pretrained: Optional[str] = None  # open_clip tag or local weights; null = random
        lang_encoder_path: Optional[str] = None  # local HF LM directory (LLaMA, MPT, GPT-NeoX or MosaicGPT)
        tokenizer_path: Optional[str] = None  # local HF tokenizer directory (tokenizer.json)
        # Environment variable read for lang_encoder_path / tokenizer_path when they are null.
        lang_encoder_env: Optional[str] = LLAMA_ENV
        # A gated cross-attention block before every n-th LM decoder layer (layers n-1, 2n-1, ...);
        # n above the LM's layer count leaves the LM blind to images. OpenFlamingo-9B: 4.
        cross_attn_every_n_layers: int = 4
        pretrained_checkpoint_path: Optional[str] = None  # OpenFlamingo checkpoint.pt; null = none
        # Perceiver resampler sizes (must match pretrained_checkpoint_path's weights).
        perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
        # Gated cross-attention block sizes (must match pretrained_checkpoint_path's weights).
        cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
        # Which image a text token attends: v2 = the latest <image> at or before it (paper, new training);
        # v1 = the OpenFlamingo-9B release's "next image" masking, needed to reproduce its numbers.
        xattn_semantics: Literal["v1", "v2"] = "v2"
        # Which non-adapter parts train (the vision encoder never does).
        trainable: TrainableConfig = field(default_factory=TrainableConfig)
        # peft adapters injected into the LM, cross-attention or Perceiver (method null = none).
        adapters: AdapterConfig = field(default_factory=AdapterConfig)
        # dtype of the frozen parts (vision tower, LM, and the Perceiver / cross-attention when frozen); what
        # trains is kept in float32 (master weights).
        frozen_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
        # Load the LM quantised by bitsandbytes (CUDA only, not the tiny LM; its embeddings cannot train);
        # null = not quantised.
        quantization: Optional[Literal["8bit", "4bit"]] = None
        # Seed of the embedding (and untied head) rows of the added tokens when the LM vocabulary grows; a
        # checkpoint that carries the matrices overrides them. Never the process RNG: same config, same model.
        embedding_init_seed: int = 0
        # Recompute LM decoder layers and cross-attention blocks in backward: less memory, slower steps.
        gradient_checkpointing: bool = False
        # Sizes of the random in-process components chosen by a path key set to tiny (tests, CPU demo).
        tiny: TinyConfig = field(default_factory=TinyConfig)

        def validate(self, path: str) -> list[str]:
            """Start-up checks between values (the config loader reports them with the schema errors)."""
            errors = []

            def divides(part: str, whole: str, section, prefix: str, what: str) -> None:
                p, w = getattr(section, part), getattr(section, whole)
                if p < 1 or w % p:
                    errors.append(f"{prefix}.{part}: {p} does not divide {prefix}.{whole} {w} ({what})")

            tiny, prefix = self.tiny, f"{path}.tiny"
            divides("lm_heads", "lm_hidden_size", tiny, prefix, "the LM's attention heads split its width")
            divides("vision_head_width", "vision_width", tiny, prefix, "the ViT's heads split its width")
            divides(
                "patch_size", "image_size", tiny, prefix, "the vision tower only accepts images made of whole patches"
            )
            if self.cross_attn_every_n_layers < 1:
                errors.append(f"{path}.cross_attn_every_n_layers: must be >= 1, got {self.cross_attn_every_n_layers}")
            for section in ("perceiver", "cross_attention"):
                for key, value in dataclasses.asdict(getattr(self, section)).items():
                    if value < (0 if key == "depth" else 1):
                        errors.append(f"{path}.{section}.{key}: must be positive, got {value}")
            return errors

        def input_image_size(self) -> int | None:
            """The side in pixels the vision tower takes, when known before it is built (the tiny tower)."""
            return self.tiny.image_size if self.clip_vision_encoder_path == TINY else None

    @classmethod
    def from_config(cls, cfg: OpenFlamingo.Config) -> OpenFlamingo:
        """Build tokenizer, vision tower, LM and Flamingo parts; load the checkpoint; apply the policy."""
        tiny = cfg.tiny
        uses_tiny = TINY in (cfg.clip_vision_encoder_path, cfg.lang_encoder_path, cfg.tokenizer_path)
        seeded = torch.random.fork_rng(devices=[]) if uses_tiny else contextlib.nullcontext()
        with seeded:
            if uses_tiny:
                torch.manual_seed(tiny.seed)
            model = cls._build(cfg, tiny)
        if cfg.pretrained_checkpoint_path is not None:
            path = _path_key(cfg.pretrained_checkpoint_path, "pretrained_checkpoint_path", "OpenFlamingo checkpoint")
            load_openflamingo_checkpoint(model, path)
        adapters.apply_trainable_policy(model, cfg.adapters, cfg.trainable)
        # The Flamingo parts are built (and loaded) in float32; what the policy left frozen is stored in
        # frozen_dtype like the vision tower and the LM. Casting after the policy keeps the parts that train
        # at the checkpoint's full precision instead of rounding them to half and back.
        cast_frozen_parameters(model.perceiver, resolve_dtype(cfg.frozen_dtype))
        cast_frozen_parameters(model.gated_cross_attn_layers, resolve_dtype(cfg.frozen_dtype))
        # With a half-precision frozen_dtype, what trains must still be float32 (master weights).
        upcast_trainable_parameters(model)
        if cfg.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        return model

    @classmethod
    def _build(cls, cfg: OpenFlamingo.Config, tiny: TinyConfig) -> OpenFlamingo:
        dtype = resolve_dtype(cfg.frozen_dtype)
        quantization = cfg.quantization
        env = cfg.lang_encoder_env
        tok_path = _path_key(cfg.tokenizer_path, "tokenizer_path", "tokenizer directory", env)
        tokenizer = build_tiny_tokenizer(tiny.tokenizer_vocab_size) if tok_path == TINY else load_tokenizer(tok_path)

        vision_path = cfg.clip_vision_encoder_path  # a name or a JSON path: build_vision_tower checks it
        if vision_path is None:
            raise ConfigError(
                "model.clip_vision_encoder_path is not set: give an open_clip model name "
                "(ViT-L-14), a model-config JSON path, or tiny (--options model.clip_vision_encoder_path=...)"
            )
        if vision_path == TINY:
            vision = tiny_vision_tower(
                tiny.image_size, tiny.patch_size, tiny.vision_width, tiny.vision_layers, tiny.vision_head_width
            )
        else:
            vision = build_vision_tower(vision_path, cfg.clip_vision_encoder_pretrained)
        vision.visual.to(dtype)

        lm_path = _path_key(cfg.lang_encoder_path, "lang_encoder_path", "language model directory", env)
        if lm_path == TINY:
            if quantization is not None:
                raise ConfigError("model.quantization: the tiny language model cannot be quantised; set it to null")
            lang_encoder = tiny_language_model(tiny, len(tokenizer), tokenizer.pad_token_id).to(dtype)
        else:
            if quantization is not None and not torch.cuda.is_available():
                raise ConfigError(
                    f"model.quantization={quantization!r} needs a CUDA GPU (bitsandbytes); none is "
                    "available. Set model.quantization=null to run on the CPU."
                )
            lang_encoder = family_of_directory(lm_path).load(lm_path, dtype, quantization)
        # v1 (LLaMA) grows the matrices by the 3 added tokens; v2 shrinks 50432 rows to len(tokenizer).
        family = family_of_model(lang_encoder)
        family.resize_embeddings(lang_encoder, len(tokenizer), cfg.embedding_init_seed)
        family.prepare(lang_encoder)

        model = cls(
            vision.visual,
            lang_encoder,
            vis_dim=vision.vis_dim,
            media_token_id=tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
            eoc_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK),
            pad_token_id=tokenizer.pad_token_id,
            cross_attn_every_n_layers=cfg.cross_attn_every_n_layers,
            perceiver=dataclasses.asdict(cfg.perceiver),
            cross_attention=dataclasses.asdict(cfg.cross_attention),
            xattn_semantics=cfg.xattn_semantics,
        )
        model.tokenizer = tokenizer
        model.image_processor = vision.image_processor
        model.image_size = vision.image_size
        return model

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
        """Flamingo's forward; in training mode with ``labels``, ``.loss`` also holds ``training_loss_extras()``.

        The extras belong in the forward (not in the task or the runner) so that every task gets them and
        DistributedDataParallel sees them as part of the one forward pass. ``loss_only``: see Flamingo.forward.
        """
        output = super().forward(
            vision_x, lang_x, attention_mask=attention_mask, labels=labels, loss_only=loss_only, **lm_kwargs
        )
        if labels is not None and self.training:
            extras = self.training_loss_extras()
            if extras is not None:
                output.loss = output.loss + extras
        return output

    def score(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        continuations,
        normalize_length: bool = True,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """(B, C) log-likelihood of each continuation after each context, context encoded once.

        See :func:`lavis.models.flamingo.scoring.score_continuations`.
        """
        return score_continuations(
            self,
            vision_x,
            lang_x,
            attention_mask,
            continuations,
            normalize_length=normalize_length,
            batch_size=batch_size,
        )

    # --- training hooks the runner calls, model-agnostically (hasattr), for what adapters need ----------

    def training_loss_extras(self) -> Optional[torch.Tensor]:
        """Terms the adapters add to the training loss (AdaLoRA's orthogonality penalty); None when none."""
        return adalora.adapter_regularization_loss(self)

    def optimizer_step_hook(self) -> Optional[Callable[[int], None]]:
        """``hook(global_step)`` to call after each optimizer step, before zero_grad; None when none.

        AdaLoRA re-allocates its ranks from that step's gradients. None for the other methods, so the
        runner need not read the fp16 grad scale (a device sync) to tell whether a step was taken.
        """
        if not any(adalora.is_adalora(w) for w in adapters.peft_models(self).values()):
            return None
        return lambda global_step: adalora.update_adapter_budget(self, global_step)

    def training_state(self) -> dict:
        """Training state that is not a parameter (AdaLoRA's rank allocator); saved in checkpoints."""
        return adalora.allocator_state(self)

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state` (on resume)."""
        adalora.load_allocator_state(self, state)

    def save_adapter(self, directory: str) -> None:
        """Save the language-model adapter in peft format (lavis/models/adapter_export.py)."""
        save_adapter(self, directory)

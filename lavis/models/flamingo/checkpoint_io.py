"""Load OpenFlamingo ``checkpoint.pt`` files into our module tree, mapping every key explicitly.

Release layouts (``<layers>`` is the LM family's decoder layer path: ``model.layers`` for LLaMA (v1),
``transformer.blocks`` for MPT / MosaicGPT, ``gpt_neox.layers`` for GPT-NeoX):

- ``perceiver.*``;
- each cross-attention block as ``lang_encoder.<layers>.<i>.gated_cross_attn_layer.*`` and (v1) also its
  alias ``lang_encoder.gated_cross_attn_layers.<i>.*``; the LM's own layers (when saved) under
  ``lang_encoder.<layers>.<i>.decoder_layer.*`` or the alias ``lang_encoder.old_decoder_blocks.<i>.*``;
- the embeddings the release's "embed" rule kept: ``model.embed_tokens`` (LLaMA), ``transformer.wte``
  (MPT, also the tied head), ``gpt_neox.embed_in`` + ``embed_out`` (GPT-NeoX; our ``lm_head``).

Training checkpoints may wrap the dict in ``{"model_state_dict": ...}`` and prefix ``module.``. Rotary
``inv_freq`` buffers and boolean tensors (old GPT-NeoX attention-mask buffers) carry nothing and are
ignored. Every other key must map to a parameter of the right shape, and the tensors a checkpoint of the
family must carry must all be there: the release loaded with ``strict=False``, which hides mistakes.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lavis.common.errors import CheckpointError
from lavis.models.flamingo.language_models import family_of_model

logger = logging.getLogger(__name__)

_XATTN_ALIAS = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$")
_OLD_DECODER = re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)$")


def key_mapper(model: nn.Module):
    """``map_key(release_key) -> our name or None`` for the LM family of ``model``."""
    family = family_of_model(model.lang_encoder)
    layers = re.escape(family.layers_path)
    xattn = re.compile(rf"^lang_encoder\.{layers}\.(\d+)\.gated_cross_attn_layer\.(.+)$")
    decoder = re.compile(rf"^lang_encoder\.{layers}\.(\d+)\.decoder_layer\.(.+)$")
    head_alias = None
    if family.is_tied(model.lang_encoder):  # a native tied LM lists its head once, as the embedding
        head_alias = "lang_encoder." + family.checkpoint_required(model.lang_encoder)[0]

    def map_key(key: str) -> str | None:
        if key.endswith("rotary_emb.inv_freq"):
            return None
        if m := xattn.match(key) or _XATTN_ALIAS.match(key):
            return f"gated_cross_attn_layers.{m.group(1)}.{m.group(2)}"
        if m := decoder.match(key) or _OLD_DECODER.match(key):
            return f"lang_encoder.{family.layers_path}.{m.group(1)}.{m.group(2)}"
        if key.startswith("vision_encoder.visual."):  # v1 kept the whole CLIP model
            return "vision_encoder." + key[len("vision_encoder.visual.") :]
        if key.startswith("lang_encoder."):
            name = "lang_encoder." + family.checkpoint_name(key[len("lang_encoder.") :])
            if name == "lang_encoder.lm_head.weight" and head_alias is not None:
                return head_alias
            return name
        return key

    return map_key


def flamingo_keys(model: nn.Module) -> list[str]:
    """Names a Flamingo checkpoint must provide: Perceiver, cross-attention blocks, the family's embeddings."""
    names = [n for n, _ in model.named_parameters() if n.startswith(("perceiver.", "gated_cross_attn_layers."))]
    family = family_of_model(model.lang_encoder)
    return names + ["lang_encoder." + n for n in family.checkpoint_required(model.lang_encoder)]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat ``name -> tensor`` dict of a checkpoint file (unwrapped, ``module.`` stripped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path} (model.pretrained_checkpoint_path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / non-weights files
        raise CheckpointError(f"{path}: cannot read as a torch weights file: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (or {{'model_state_dict': ...}})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_openflamingo_checkpoint(model: nn.Module, path: str | Path, require_flamingo_keys: bool = True) -> list[str]:
    """Copy a release-format checkpoint into ``model``; returns the names that were set.

    Fails (CheckpointError) on a key that maps to nothing in the model, a shape mismatch, two aliases
    that disagree, or (with ``require_flamingo_keys``) any missing Perceiver / xattn / embedding tensor.
    """
    state = read_checkpoint(path)
    map_key = key_mapper(model)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    mapped: dict[str, torch.Tensor] = {}
    unknown, bad_shape, conflicts = [], [], []
    for key, tensor in state.items():
        name = map_key(key)
        if name is None or tensor.dtype == torch.bool:
            continue
        if name not in params:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(params[name].shape):
            bad_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {name} {tuple(params[name].shape)}")
            continue
        if name in mapped and not torch.equal(mapped[name], tensor):
            conflicts.append(f"{key} differs from its alias for {name}")
        mapped[name] = tensor
    missing = [n for n in flamingo_keys(model) if n not in mapped] if require_flamingo_keys else []
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} expected tensors: {', '.join(missing[:12])}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatches: {'; '.join(bad_shape[:8])}")
    if unknown:
        problems.append(f"{len(unknown)} keys match no parameter: {', '.join(unknown[:12])}")
    if conflicts:
        problems.append("; ".join(conflicts[:8]))
    if problems:
        raise CheckpointError(
            f"{path}: does not fit the model (built for a different LM / vision tower / "
            f"cross_attn_every_n_layers?): " + " | ".join(problems)
        )
    with torch.no_grad():
        for name, tensor in mapped.items():
            params[name].copy_(tensor)
    groups = Counter(name.split(".")[0] for name in mapped)
    logger.info(
        "loaded %d tensors from %s (%s)", len(mapped), path, ", ".join(f"{k}: {v}" for k, v in sorted(groups.items()))
    )
    return sorted(mapped)

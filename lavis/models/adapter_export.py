"""Export of a fine-tuned Flamingo: the LM adapter in peft's format, the LM merged, the release layout.

- ``save_adapter``: peft's own format (``PeftModel.from_pretrained(plain_llama, dir)``);
- ``merge_and_export``: the adapter merged into a plain HF model folder (``AutoModelForCausalLM``);
- ``openflamingo_state_dict``: a ``checkpoint.pt`` in the OpenFlamingo release's key layout.

Folders are written atomically (``lavis.common.fileio.atomic_directory``): a reader sees the old complete
folder or the new one. ``lavis.models.adapters`` forwards ``save_adapter`` and ``merge_and_export`` here.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lavis.common.errors import ConfigError
from lavis.common.fileio import atomic_directory
from lavis.models.adapters import peft_models, unwrap_model
from lavis.models.language_model import is_quantized


def _lm_wrapper(model: nn.Module):
    wrapper = peft_models(model).get("lang_encoder")
    if wrapper is None:
        raise ConfigError(
            "the language model has no adapter (adapters.method is null or adapters.apply_to lacks 'lang_encoder'); "
            "there is nothing to save or merge"
        )
    return wrapper


def save_adapter(
    model: nn.Module,
    directory: str,
    base_model_name_or_path: str | None = None,
    extra: Callable[[str], None] | None = None,
) -> None:
    """Save the LM adapter in peft's format (adapter_config.json + adapter_model.safetensors), atomically.

    `peft.PeftModel.from_pretrained(plain_llama, directory)` reproduces our language model. When the
    input embedding trains (new-token rows or all rows), the embedding matrices are saved too, since
    the adapter alone would not reproduce the LM; the plain LLaMA must then have the resized
    vocabulary (the tokenizer with the added tokens). Adapters on the cross-attention / perceiver
    are not here: they are part of trainable_state_dict. ``base_model_name_or_path`` is written into
    adapter_config.json (peft leaves it null for a model built in memory); ``extra(folder)`` may add
    files to the folder before it is renamed into place.
    """
    wrapper = _lm_wrapper(model)
    embedding_trains = unwrap_model(model).lang_encoder.get_input_embeddings().weight.requires_grad
    with atomic_directory(directory) as tmp:
        # An explicit save_embedding_layers: peft's "auto" would compare vocab sizes against the base
        # model's config, possibly looking it up on the Hub.
        wrapper.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=embedding_trains)
        if base_model_name_or_path is not None:
            config_path = os.path.join(tmp, "adapter_config.json")
            with open(config_path, encoding="utf-8") as handle:
                peft_config = json.load(handle)
            peft_config["base_model_name_or_path"] = base_model_name_or_path
            with open(config_path, "w", encoding="utf-8") as handle:
                json.dump(peft_config, handle, indent=2, sort_keys=True)
        if extra is not None:
            extra(tmp)


def merged_state_dict(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the plain state dict of `module` with every adapter merged in, the prefixes of the adapted modules).

    `module` itself is unchanged.

    Each adapted layer is merged, its weights copied, then restored bit-exactly from a copy of the
    original (unmerge alone would leave rounding error), one layer at a time to bound the extra memory.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    merged: dict[str, torch.Tensor] = {}
    replaced = []  # module prefixes whose entries come from the merge, not from the raw state dict
    for name, layer in module.named_modules():
        if any(name.startswith(p) for p in replaced):
            continue
        if isinstance(layer, BaseTunerLayer):
            base = layer.get_base_layer()
            originals = {k: v.detach().clone() for k, v in base.state_dict().items()}
            layer.merge()
            merged.update({f"{name}.{k}": v.detach().clone() for k, v in base.state_dict().items()})
            with warnings.catch_warnings():
                # (IA)^3 warns that unmerge is inexact; the copy-back below makes it exact.
                warnings.filterwarnings("ignore", message="Unmerge result can be inaccurate")
                layer.unmerge()
            with torch.no_grad():
                for k, v in base.state_dict().items():
                    v.copy_(originals[k])
            replaced.append(name + ".")
        elif isinstance(layer, ModulesToSaveWrapper):
            trained = layer.modules_to_save[layer.active_adapters[0]]
            merged.update({f"{name}.{k}": v.detach() for k, v in trained.state_dict().items()})
            replaced.append(name + ".")
    for key, value in module.state_dict().items():
        if not any(key.startswith(p) for p in replaced):
            merged[key] = value
    return merged, replaced


def merge_and_export(model: nn.Module, directory: str) -> None:
    """Merge the LM adapter into the weights and save a plain HF model directory (plus the tokenizer).

    The directory loads with AutoModelForCausalLM and gives the adapted LM's outputs; `model` itself
    keeps its (unmerged) adapter, so training or evaluation can go on.
    """
    from transformers import AutoModelForCausalLM

    _lm_wrapper(model)
    net = unwrap_model(model)
    lang_encoder = net.lang_encoder
    if is_quantized(lang_encoder):
        raise ConfigError("merge_and_export: cannot merge into a quantised language model; load it unquantised")
    state, _ = merged_state_dict(lang_encoder)
    with torch.device("meta"):  # the key set of a plain model, without allocating one
        expected = set(AutoModelForCausalLM.from_config(lang_encoder.config).state_dict())
    if set(state) != expected:
        raise RuntimeError(
            f"merged state dict does not match a plain {type(lang_encoder).__name__}: "
            f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    with atomic_directory(directory) as tmp:
        lang_encoder.save_pretrained(tmp, state_dict=state)
        if net.tokenizer is not None:
            net.tokenizer.save_pretrained(tmp)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def openflamingo_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned Flamingo parts as a ``checkpoint.pt`` of the OpenFlamingo release (flat, float32).

    Keys as the release writes them: ``perceiver.*``, each cross-attention block under both of its names
    (``lang_encoder.gated_cross_attn_layers.<i>.*`` and ``lang_encoder.model.layers.<i>.gated_cross_attn_layer.*``),
    ``lang_encoder.model.embed_tokens.weight`` and each decoder layer's ``rotary_emb.inv_freq``. Adapters
    are merged in. An LM adapter changes decoder weights, which the release file does not carry; the merged
    weights of exactly the adapted modules are added under the release's names
    (``lang_encoder.model.layers.<i>.decoder_layer.*``), so the file holds the whole fine-tuned model
    beside the plain LLaMA and still loads with ``load_state_dict(strict=False)`` without unexpected keys.
    """
    net = unwrap_model(model)
    if is_quantized(net.lang_encoder):
        raise ConfigError("the openflamingo export merges adapters: load the language model unquantised")
    perceiver, _ = merged_state_dict(net.perceiver)
    xattn, _ = merged_state_dict(net.gated_cross_attn_layers)
    out = {f"perceiver.{k}": v for k, v in perceiver.items()}
    for key, value in xattn.items():
        layer, rest = key.split(".", 1)
        out[f"lang_encoder.gated_cross_attn_layers.{layer}.{rest}"] = value
        out[f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer.{rest}"] = value
    lm = net.lang_encoder
    out["lang_encoder.model.embed_tokens.weight"] = lm.get_input_embeddings().weight.detach()
    if peft_models(net).get("lang_encoder") is not None:
        merged, adapted = merged_state_dict(lm)
        for key, value in merged.items():
            match = _LAYER.match(key)
            if match and any(key.startswith(prefix) for prefix in adapted):
                out[f"lang_encoder.model.layers.{match.group(1)}.decoder_layer.{match.group(2)}"] = value
    inv_freq = _rotary_inv_freq(lm)
    for i in range(lm.config.num_hidden_layers):
        out[f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = inv_freq
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in out.items()}


def _rotary_inv_freq(lm: nn.Module) -> torch.Tensor:
    """The rotary frequencies each release decoder layer stored (transformers 5 keeps one set per model)."""
    for name, buffer in lm.named_buffers():
        if name.endswith("rotary_emb.inv_freq"):
            return buffer
    rotary = getattr(lm.get_decoder(), "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):  # transformers' rotary module (varies by version)
        return rotary.inv_freq
    config = lm.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = getattr(config, "rope_theta", 10000.0)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

"""Export of the language-model adapter: peft's own format, or merged into a plain HF model folder.

Both write a whole folder atomically (``lavis.common.fileio.atomic_directory``): a reader sees the old
complete folder or the new one. ``lavis.models.adapters`` forwards ``save_adapter`` and
``merge_and_export`` to this module.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lavis.common.errors import ConfigError
from lavis.common.fileio import atomic_directory
from lavis.models.adapters import peft_models, unwrap_model
from lavis.models.quantization import is_quantized


def _lm_wrapper(model: nn.Module):
    wrapper = peft_models(model).get("lang_encoder")
    if wrapper is None:
        raise ConfigError(
            "the language model has no adapter (adapters.method is null or adapters.apply_to lacks 'lang_encoder'); "
            "there is nothing to save or merge"
        )
    return wrapper


def save_adapter(model: nn.Module, directory: str) -> None:
    """Save the LM adapter in peft's format (adapter_config.json + adapter_model.safetensors), atomically.

    `peft.PeftModel.from_pretrained(plain_llama, directory)` reproduces our language model. When the
    input embedding trains (new-token rows or all rows), the embedding matrices are saved too, since
    the adapter alone would not reproduce the LM; the plain LLaMA must then have the resized
    vocabulary (the tokenizer with the added tokens). Adapters on the cross-attention / perceiver
    are not here: they are part of trainable_state_dict.
    """
    wrapper = _lm_wrapper(model)
    embedding_trains = unwrap_model(model).lang_encoder.get_input_embeddings().weight.requires_grad
    with atomic_directory(directory) as tmp:
        # An explicit save_embedding_layers: peft's "auto" would compare vocab sizes against the base
        # model's config, possibly looking it up on the Hub.
        wrapper.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=embedding_trains)


def _merged_lm_state_dict(lang_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The plain-model state dict of `lang_encoder` with every adapter merged in; the model is unchanged.

    Each adapted layer is merged, its weights copied, then restored bit-exactly from a copy of the
    original (unmerge alone would leave rounding error), one layer at a time to bound the extra memory.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    merged: dict[str, torch.Tensor] = {}
    replaced = []  # module prefixes whose entries come from the merge, not from the raw state dict
    for name, module in lang_encoder.named_modules():
        if any(name.startswith(p) for p in replaced):
            continue
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            originals = {k: v.detach().clone() for k, v in base.state_dict().items()}
            module.merge()
            merged.update({f"{name}.{k}": v.detach().clone() for k, v in base.state_dict().items()})
            with warnings.catch_warnings():
                # (IA)^3 warns that unmerge is inexact; the copy-back below makes it exact.
                warnings.filterwarnings("ignore", message="Unmerge result can be inaccurate")
                module.unmerge()
            with torch.no_grad():
                for k, v in base.state_dict().items():
                    v.copy_(originals[k])
            replaced.append(name + ".")
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]]
            merged.update({f"{name}.{k}": v.detach() for k, v in trained.state_dict().items()})
            replaced.append(name + ".")
    for key, value in lang_encoder.state_dict().items():
        if not any(key.startswith(p) for p in replaced):
            merged[key] = value
    return merged


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
        raise ConfigError(
            "merge_and_export: cannot merge into a quantised language model; load it unquantised"
        )
    state = _merged_lm_state_dict(lang_encoder)
    with torch.device("meta"):  # the key set of a plain model, without allocating one
        expected = set(AutoModelForCausalLM.from_config(lang_encoder.config).state_dict())
    if set(state) != expected:
        raise RuntimeError(
            f"merged state dict does not match a plain {type(lang_encoder).__name__}: "
            f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    with atomic_directory(directory) as tmp:
        lang_encoder.save_pretrained(tmp, state_dict=state)
        tokenizer = getattr(net, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

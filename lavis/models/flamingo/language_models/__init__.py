"""Language-model families: the family of an LM directory (its config.json ``model_type``) or of a built LM."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lavis.common.errors import ConfigError
from lavis.models.flamingo.language_models.base import LanguageModelFamily
from lavis.models.flamingo.language_models.gpt_neox import GPT_NEOX
from lavis.models.flamingo.language_models.llama import LLAMA
from lavis.models.flamingo.language_models.mosaic_gpt import MOSAIC_GPT
from lavis.models.flamingo.language_models.mpt import MPT

FAMILIES: dict[str, LanguageModelFamily] = {f.name: f for f in (LLAMA, MPT, GPT_NEOX, MOSAIC_GPT)}

__all__ = ["FAMILIES", "LanguageModelFamily", "family_of_directory", "family_of_model"]


def _known() -> str:
    return "; ".join(f"{name} = {f.description}" for name, f in FAMILIES.items())


def family_of_directory(path: str) -> LanguageModelFamily:
    """The family named by ``path/config.json``'s ``model_type``; ConfigError naming the known families."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"model.lang_encoder_path: {path!r} has no config.json (a Hugging Face LM directory is expected)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.lang_encoder_path: {config_file} is not valid JSON: {err}") from err
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model.lang_encoder_path: {path} has model_type {model_type!r}, which is no supported "
            f"family (remote code is never run); expected one of: {_known()}"
        )
    return FAMILIES[model_type]


def family_of_model(lm: nn.Module) -> LanguageModelFamily:
    """The family of a built causal LM (by ``config.model_type``)."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise TypeError(
            f"{type(lm).__name__} (model_type {model_type!r}) is no supported LM family; expected one of: {_known()}"
        )
    return FAMILIES[model_type]

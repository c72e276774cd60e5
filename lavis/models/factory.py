"""``build_model``: the model class a config section names, built from its Config instance."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import OmegaConf

from lavis.common.errors import ConfigError
from lavis.common.registry import registry
from lavis.common.schema import config_instance
from lavis.models.base import ModelConfig


def build_model(model_cfg):
    """Build the model a config section names (``arch`` picks the class; omitted keys take defaults).

    ``model_cfg`` is the loader's section (a structured node of the class's ``Config``), a ``Config``
    instance, or a plain mapping from code, validated here by the loader's own check. Returns the network
    with ``.tokenizer``, ``.image_processor`` and ``.image_size``.
    """
    if OmegaConf.is_config(model_cfg) and OmegaConf.get_type(model_cfg) not in (dict, None):
        model_cfg = OmegaConf.to_object(model_cfg)  # the loader validated it: its Config instance
    if isinstance(model_cfg, ModelConfig):
        arch = model_cfg.arch
    elif isinstance(model_cfg, Mapping) or OmegaConf.is_config(model_cfg):
        arch = model_cfg.get("arch")
    else:
        raise ConfigError(f"model: expected a mapping or a model Config, got {type(model_cfg).__name__}")
    if not arch:
        raise ConfigError("model.arch is not set: name the model class, e.g. model.arch=openflamingo")
    cls = registry.get("model", arch, key_path="model.arch")
    return cls.from_config(config_instance(cls.Config, model_cfg, "model"))

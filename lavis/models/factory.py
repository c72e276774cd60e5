"""``build_model``: the model class a config section names, built from it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lavis.common.errors import ConfigError
from lavis.common.registry import registry


def build_model(model_cfg):
    """Build the model a config section names (``arch`` picks the class; omitted keys take defaults).

    Returns the network with ``.tokenizer``, ``.image_processor`` and ``.image_size``.
    """
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    if not isinstance(model_cfg, dict) or not model_cfg.get("arch"):
        raise ConfigError("model.arch is not set: name the model class, e.g. model.arch=openflamingo")
    cls = registry.get("model", model_cfg["arch"], key_path="model.arch")
    return cls.from_config(model_cfg)

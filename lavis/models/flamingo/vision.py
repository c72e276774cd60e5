"""The open_clip vision tower and the patch tokens OpenFlamingo feeds to its Perceiver.

OpenFlamingo-9B was released with open_clip 2.16-2.22, whose ``visual(x)[1]`` returned the patch tokens
of the last transformer block: after ``ln_pre``, without ``ln_post``, ``proj`` or the CLS token.
open_clip >= 2.23 applies ``ln_post`` to those tokens, which silently changes the features, so we
compute them explicitly here instead of relying on ``output_tokens``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_vision_tower
from open_clip.transform import image_transform
from torch import nn

from lavis.common.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class VisionTower:
    """What the network needs from the vision side."""

    visual: nn.Module  # open_clip VisionTransformer (text tower dropped)
    image_processor: object  # PIL -> (C, H, W) tensor, open_clip eval transform
    vis_dim: int  # width of the patch tokens (vision_cfg.width)
    image_size: int


def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens of the last block, after ``ln_pre``, without CLS / ``ln_post`` / ``proj``: (N, P, width)."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (N, width, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat((cls, x), dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    return x[:, 1:]


def _image_size(vision_cfg: dict) -> int:
    size = vision_cfg.get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _model_config(name_or_path: str) -> tuple[str, dict]:
    """(model name, open_clip model config) from a registered name or a JSON file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(
                f"model.clip_vision_encoder_path: open_clip model-config file {name_or_path!r} does not exist; "
                "give an open_clip model name (e.g. ViT-L-14) or the path of its JSON config "
                "(--options model.clip_vision_encoder_path=...)"
            )
        try:
            return path.stem, json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"model.clip_vision_encoder_path: {name_or_path} is not valid JSON: {err}") from err
    cfg = open_clip.get_model_config(name_or_path)
    if cfg is None:
        known = ", ".join(sorted(open_clip.list_models())[:20])
        raise ConfigError(
            f"model.clip_vision_encoder_path: unknown open_clip model {name_or_path!r} and no such file; "
            f"known names include {known}, ..."
        )
    return name_or_path, cfg


def _load_visual_weights(visual: nn.Module, weights_path: str) -> None:
    """Load the ``visual.*`` part of a full CLIP state dict (or a bare visual state dict) strictly."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    result = visual.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        from lavis.common.errors import CheckpointError

        raise CheckpointError(
            f"{weights_path}: vision weights do not fit the tower: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    logger.info("vision tower weights: %d tensors from %s", len(state), weights_path)


def build_vision_tower(name_or_path: str, pretrained: str | None) -> VisionTower:
    """The open_clip visual tower for a model name or JSON config; ``pretrained`` = tag, weights file or None."""
    if not name_or_path:
        raise ConfigError(
            "model.clip_vision_encoder_path is not set; give an open_clip model name (ViT-L-14) "
            "or a model-config JSON path (--options model.clip_vision_encoder_path=...)"
        )
    name, cfg = _model_config(name_or_path)
    vision_cfg = dict(cfg["vision_cfg"])
    quick_gelu = bool(cfg.get("quick_gelu", False))
    is_file = pretrained is not None and (
        os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))
    )
    if pretrained is None or is_file:
        visual = _build_vision_tower(cfg.get("embed_dim", vision_cfg["width"]), vision_cfg, quick_gelu)
        if is_file:
            if not Path(pretrained).is_file():
                raise ConfigError(
                    f"model.clip_vision_encoder_pretrained: weights file {pretrained!r} does not exist; set it "
                    "with --options model.clip_vision_encoder_pretrained=PATH (or null for random init)"
                )
            _load_visual_weights(visual, pretrained)
        else:
            logger.info("vision tower %s: random initialisation (clip_vision_encoder_pretrained is null)", name)
    else:
        try:
            clip = open_clip.create_model(name, pretrained=pretrained)
        except RuntimeError as err:  # open_clip raises RuntimeError for unknown tags / failed downloads
            raise ConfigError(
                f"model.clip_vision_encoder_pretrained: cannot load {name} weights {pretrained!r}: "
                f"{err}. Give a local weights file instead."
            ) from err
        visual = clip.visual
        logger.info("vision tower weights: open_clip %s pretrained=%s", name, pretrained)
    size = _image_size(vision_cfg)
    processor = image_transform(
        size, is_train=False, mean=getattr(visual, "image_mean", None), std=getattr(visual, "image_std", None)
    )
    return VisionTower(visual, processor, int(vision_cfg["width"]), size)


def tiny_vision_tower(
    image_size: int = 64, patch_size: int = 16, width: int = 64, layers: int = 2, head_width: int = 32
) -> VisionTower:
    """A random-initialised open_clip ViT for tests and the CPU demo (QuickGELU, like OpenAI CLIP)."""
    vision_cfg = {
        "image_size": image_size,
        "patch_size": patch_size,
        "width": width,
        "layers": layers,
        "head_width": head_width,
    }
    visual = _build_vision_tower(width, vision_cfg, quick_gelu=True)
    return VisionTower(visual, image_transform(image_size, is_train=False), width, image_size)

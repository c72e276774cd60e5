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
import torch.nn.functional as F
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


def _sequence_first_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip residual attention block on x (L, N, D), computed as open_clip 2.16-2.22 ran it.

    Those releases ran the blocks sequence-first with ``nn.MultiheadAttention(batch_first=False)``; open_clip
    >= 2.23 runs them batch-first, where torch's fused inference fast path takes over and rounds differently
    (vision tokens 5e-7 apart, enough to move the sharp tiny v2 fixtures' logits by 1e-5..1e-4).
    """
    attn = block.attn
    h = block.ln_1(x)
    out, _ = F.multi_head_attention_forward(
        h, h, h, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, attn.bias_k, attn.bias_v,
        attn.add_zero_attn, attn.dropout, attn.out_proj.weight, attn.out_proj.bias,
        training=attn.training, need_weights=False,
    )  # fmt: skip
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens of the last block, after ``ln_pre``, without CLS / ``ln_post`` / ``proj``: (N, P, width)."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (N, width, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat((cls, x), dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x).permute(1, 0, 2)  # (L, N, D), as the open_clip releases of OpenFlamingo
    for block in visual.transformer.resblocks:
        if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            x = _sequence_first_block(block, x)
        else:  # a custom block type: its own (batch-first) forward
            x = block(x.permute(1, 0, 2)).permute(1, 0, 2)
    return x.permute(1, 0, 2)[:, 1:]


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

"""MosaicGPT (MPT-1B-RedPajama, OpenFlamingo-3B): our native port, loaded without remote code.

MosaicGPT is MPT plus QK-LayerNorm: LayerNorms over the full query and key widths (``attn.q_ln``,
``attn.k_ln``) between the fused QKV projection and the head split. Everything else (ALiBi with bias
max 8, no biases anywhere, LayerNorms without bias, exact-GELU MLP of ratio 4, head tied to ``wte``)
is what native ``MptForCausalLM`` computes, so the port is that class with its attention replaced.
The original weights (``pytorch_model.bin``, shards, or safetensors) load through an explicit key map:
``ln_1`` -> ``norm_1``, ``ln_2`` -> ``norm_2``, ``mlp.mlp_up`` -> ``ffn.up_proj``,
``mlp.mlp_down`` -> ``ffn.down_proj``; every other name is unchanged. The v2 checkpoint's Flamingo keys
(``transformer.blocks.{i}.gated_cross_attn_layer.*``, ``transformer.wte``) fit it as they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers import MptConfig, MptForCausalLM
from transformers.models.mpt.modeling_mpt import MptAttention

from lavis.common.errors import CheckpointError, ConfigError
from lavis.models.flamingo.language_models.base import LanguageModelFamily
from lavis.models.flamingo.language_models.mpt import check_mpt_config

_RENAMES = (
    (re.compile(r"\.ln_1\."), ".norm_1."),
    (re.compile(r"\.ln_2\."), ".norm_2."),
    (re.compile(r"\.mlp\.mlp_up\."), ".ffn.up_proj."),
    (re.compile(r"\.mlp\.mlp_down\."), ".ffn.down_proj."),
)


class MosaicGPTConfig(MptConfig):
    """MptConfig that says it is MosaicGPT (so the family of a built model is known)."""

    model_type = "mosaic_gpt"


class MosaicGPTAttention(MptAttention):
    """MPT attention with LayerNorms (no bias) on the full query and key widths before the head split."""

    def __init__(self, config: MptConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.q_ln = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        self.k_ln = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon, bias=False)

    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        """Same contract as MptAttention.forward: (output, attention weights)."""
        b, n = hidden_states.shape[:2]
        query, key, value = self.Wqkv(hidden_states).chunk(3, dim=2)
        query, key = self.q_ln(query).to(value.dtype), self.k_ln(key).to(value.dtype)
        query, key, value = (t.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in (query, key, value))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        scores = (query @ key.transpose(-1, -2)) * self.softmax_scale
        if position_bias is not None:
            # ALiBi bias (heads, 1, max_len): slope * (key position - last position), the last keys.
            scores = scores + position_bias[:, :, position_bias.shape[-1] - key.shape[-2] :]
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, torch.finfo(query.dtype).min)
        weights = scores.float().softmax(dim=-1).to(value.dtype)
        weights = nn.functional.dropout(weights, p=self.attn_dropout_p, training=self.training)
        out = (weights @ value).transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(out), weights


class MosaicGPTForCausalLM(MptForCausalLM):
    """Native MPT with MosaicGPT's QK-LayerNorm attention in every block."""

    config_class = MosaicGPTConfig

    def __init__(self, config: MptConfig):
        super().__init__(config)
        for i, block in enumerate(self.transformer.blocks):
            block.attn = MosaicGPTAttention(config, i)


def mosaic_gpt_config(config: dict, path: str = "") -> MosaicGPTConfig:
    """Our config from a MosaicGPT config.json (d_model, n_heads, n_layers, ...); refuses what we do not port."""
    check_mpt_config(config, path, "mosaic_gpt")
    if config.get("attn_qk_ln") is not True:
        raise ConfigError(
            f"model.lang_encoder_path: {path}/config.json is mosaic_gpt without attn_qk_ln; "
            "only MPT-1B's QK-LayerNorm variant is ported"
        )
    if config.get("attn_clip_qkv") is not None:
        raise ConfigError(f"model.lang_encoder_path: {path}/config.json sets attn_clip_qkv (not ported)")
    return MosaicGPTConfig(
        d_model=config["d_model"],
        n_heads=config["n_heads"],
        n_layers=config["n_layers"],
        max_seq_len=config["max_seq_len"],
        vocab_size=config["vocab_size"],
        expansion_ratio=4,
        layer_norm_epsilon=1e-5,
        use_cache=True,
        attn_config={"alibi": True, "alibi_bias_max": 8, "softmax_scale": config.get("softmax_scale")},
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, pytorch_model.bin, or their sharded index."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index_name).is_file():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
        elif (path / single).is_file():
            files = [single]
        else:
            continue
        state = {}
        for name in files:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                state.update(load_file(str(path / name)))
            else:
                state.update(torch.load(path / name, map_location="cpu", weights_only=True))
        return state
    raise ConfigError(f"model.lang_encoder_path: {path} has no model.safetensors or pytorch_model.bin (or index)")


def map_mosaic_key(key: str) -> str:
    """Our parameter name for a MosaicGPT weight name."""
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


class MosaicGPTFamily(LanguageModelFamily):
    """MosaicGPT: built from its config.json and loaded through the explicit key map, strictly."""

    def load(self, path, dtype, quantization):
        if quantization is not None:
            raise ConfigError(
                "model.quantization: the MosaicGPT port (MPT-1B) loads unquantised only; set it "
                "to null (the LM is 1.3B parameters)"
            )
        directory = Path(path)
        config = mosaic_gpt_config(json.loads((directory / "config.json").read_text()), path)
        lm = MosaicGPTForCausalLM(config)
        own = dict(lm.named_parameters())
        state = {map_mosaic_key(k): v for k, v in read_weights(directory).items()}
        state.pop("lm_head.weight", None)  # tied: the same matrix as transformer.wte
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = [
            f"{k}: file {tuple(state[k].shape)} vs port {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(state))
            if state[k].shape != own[k].shape
        ]
        if missing or unexpected or bad:
            raise CheckpointError(
                f"{path}: MosaicGPT weights do not fit the port: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}, shapes {bad[:4]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)
        return lm.to(dtype).eval()


MOSAIC_GPT = MosaicGPTFamily(
    name="mosaic_gpt",
    takes_position_ids=False,
    layers_path="transformer.blocks",
    lora_target_modules=("Wqkv", "out_proj", "up_proj", "down_proj"),
    description="MosaicGPT (MPT-1B-RedPajama, OpenFlamingo-3B; our port)",
)

"""MPT (MPT-7B, OpenFlamingo-9B v2): native MptForCausalLM, whose names equal llm-foundry's MPT.

The release loaded ``anas-awadalla/mpt-7b`` through remote code; the native class computes the same
network for the configurations checked here (ALiBi with bias max 8, no biases, no QK-LayerNorm, MLP
ratio 4). A directory asking for anything the native class does not implement is refused, not
silently approximated. The head is tied to ``transformer.wte``, which the checkpoint carries.
"""

from __future__ import annotations

import json
from pathlib import Path

from lavis.common.errors import ConfigError
from lavis.models.flamingo.language_models.base import LanguageModelFamily


def check_mpt_config(config: dict, path: str, family: str) -> None:
    """ConfigError listing every setting of an MPT-style config.json the native port does not compute."""
    attn = dict(config.get("attn_config") or {})
    ratio = config.get("expansion_ratio", config.get("mlp_ratio", 4))
    problems = []
    if attn.get("alibi", config.get("alibi", True)) is not True:
        problems.append("alibi: false (learned positions)")
    if attn.get("alibi_bias_max", config.get("alibi_bias_max", 8)) != 8:
        problems.append(f"alibi_bias_max {attn.get('alibi_bias_max', config.get('alibi_bias_max'))} (only 8)")
    if family == "mpt" and attn.get("qk_ln"):
        problems.append("attn_config.qk_ln: true")
    if ratio != 4:
        problems.append(f"MLP ratio {ratio} (only 4)")
    if config.get("no_bias", True) is not True:
        problems.append("no_bias: false")
    if config.get("logit_scale") not in (None, 1, 1.0):
        problems.append(f"logit_scale {config.get('logit_scale')}")
    if config.get("embedding_fraction", 1.0) != 1.0:
        problems.append(f"embedding_fraction {config.get('embedding_fraction')}")
    if attn.get("prefix_lm") or config.get("prefix_lm"):
        problems.append("prefix_lm: true")
    if problems:
        raise ConfigError(
            f"model.lang_encoder_path: {path}/config.json ({family}) uses settings the native "
            f"port does not implement: {', '.join(problems)}"
        )


class MptFamily(LanguageModelFamily):
    """MPT with the config checked before the native class loads it."""

    def load(self, path, dtype, quantization):
        check_mpt_config(json.loads((Path(path) / "config.json").read_text()), path, "mpt")
        return super().load(path, dtype, quantization)


MPT = MptFamily(
    name="mpt",
    takes_position_ids=False,
    layers_path="transformer.blocks",
    lora_target_modules=("Wqkv", "out_proj", "up_proj", "down_proj"),
    description="MPT (MPT-7B, OpenFlamingo-9B v2; MptForCausalLM)",
)

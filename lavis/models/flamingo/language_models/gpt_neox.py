"""GPT-NeoX (RedPajama-INCITE-3B, OpenFlamingo-4B): native GPTNeoXForCausalLM.

Its output head is ``lm_head`` in transformers 5 but ``embed_out`` in the v2 checkpoints (and in the
RedPajama directories, which ``from_pretrained`` renames itself). The v2 checkpoint carries both
``gpt_neox.embed_in`` and ``embed_out`` (kept by the release's "embed" rule although frozen).

Self-attention runs in the order of operations of the transformers release OpenFlamingo v2 was built on
(4.28-4.36), whose GPT-NeoX had only this eager attention: the scaled scores come from one
``baddbmm(zeros, q, k^T, alpha=scale)``, then the additive mask, softmax and ``@ v``. transformers 5 computes
the scores as ``(q @ k^T) * scale`` (eager) or in the fused SDPA kernel, which round differently; on the
v2 reference fixtures (sharp attention) that alone moved the logits by up to 2.3e-4, past their 1e-4 tolerance.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from lavis.models.flamingo.language_models.base import LanguageModelFamily

REFERENCE_ATTENTION = "openflamingo_v2_gpt_neox"


def reference_order_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """q, k, v (B, H, L, d), additive float mask (B, 1, L, S) or None -> ((B, L, H, d), weights)."""
    b, h, lq, d = query.shape
    lk = key.shape[-2]
    zeros = torch.zeros(b * h, lq, lk, dtype=query.dtype, device=query.device)
    scores = torch.baddbmm(
        zeros, query.reshape(b * h, lq, d), key.reshape(b * h, lk, d).transpose(1, 2), beta=1.0, alpha=scaling
    ).view(b, h, lq, lk)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :lk]
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


# The mask function must be registered under the same name, or transformers builds no (padding) mask at all.
AttentionInterface.register(REFERENCE_ATTENTION, reference_order_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE_ATTENTION, eager_mask)

GPT_NEOX = LanguageModelFamily(
    name="gpt_neox",
    layers_path="gpt_neox.layers",
    lora_target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    checkpoint_renames={"embed_out.weight": "lm_head.weight"},
    checkpoint_carries_head=True,
    attention_implementation=REFERENCE_ATTENTION,
    description="GPT-NeoX (RedPajama-INCITE-3B, OpenFlamingo-4B; GPTNeoXForCausalLM)",
)

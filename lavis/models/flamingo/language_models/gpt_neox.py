"""GPT-NeoX (RedPajama-INCITE-3B, OpenFlamingo-4B): native GPTNeoXForCausalLM.

Its output head is ``lm_head`` in transformers 5 but ``embed_out`` in the v2 checkpoints (and in the
RedPajama directories, which ``from_pretrained`` renames itself). The v2 checkpoint carries both
``gpt_neox.embed_in`` and ``embed_out`` (kept by the release's "embed" rule although frozen).
"""

from lavis.models.flamingo.language_models.base import LanguageModelFamily

GPT_NEOX = LanguageModelFamily(
    name="gpt_neox",
    layers_path="gpt_neox.layers",
    lora_target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    checkpoint_renames={"embed_out.weight": "lm_head.weight"},
    checkpoint_carries_head=True,
    description="GPT-NeoX (RedPajama-INCITE-3B, OpenFlamingo-4B; GPTNeoXForCausalLM)",
)

"""LLaMA (OpenFlamingo-9B v1): native LlamaForCausalLM, untied head that the release checkpoint omits."""

from lavis.models.flamingo.language_models.base import LanguageModelFamily

LLAMA = LanguageModelFamily(
    name="llama",
    layers_path="model.layers",
    lora_target_modules=("q_proj", "v_proj"),
    checkpoint_carries_head=False,
    description="LLaMA (OpenFlamingo-9B v1, LlamaForCausalLM)",
)

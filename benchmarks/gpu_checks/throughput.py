"""The throughput check of benchmarks/gpu_check.py: a LoRA step of a ~1B-parameter random OpenFlamingo in bf16,
its tokens/s and model FLOPs utilisation (MFU) against the GPU's peak."""

from __future__ import annotations

import time

import torch

from gpu_checks.common import Skip, model_cfg
from lavis.models import build_model

# Dense peak tensor-core TFLOP/s (bf16, or fp16 where there is no bf16) from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def check_throughput() -> str:
    """LoRA step of a ~1B-parameter random OpenFlamingo in bf16: tokens/s and MFU."""
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise Skip("this GPU has no native bf16")
    torch.manual_seed(0)
    tiny = {
        "lm_hidden_size": 2048,
        "lm_layers": 16,
        "lm_heads": 16,
        "lm_intermediate_size": 5504,
        "image_size": 224,
        "patch_size": 14,
        "vision_width": 768,
        "vision_layers": 12,
        "vision_head_width": 64,
    }
    model = build_model(
        model_cfg(
            tiny=tiny,
            frozen_dtype="bfloat16",
            cross_attn_every_n_layers=4,
            perceiver={"depth": 2, "heads": 8, "dim_head": 64, "num_latents": 64, "ff_mult": 2},
            cross_attention={"heads": 8, "dim_head": 64, "ff_mult": 2},
        )
    ).cuda()
    n_total = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.vision_encoder.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch_size, seq = 8, 256
    lang_x = torch.randint(3, 600, (batch_size, seq), device="cuda")
    lang_x[:, 0] = model.media_token_id
    vision_x = torch.randn(batch_size, 1, 1, 3, 224, 224, device="cuda")
    mask = torch.ones_like(lang_x)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(vision_x, lang_x, mask, lang_x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps, start = 10, time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = steps * batch_size * seq
    # Model FLOPs per text token: forward 2N and backward 2N through the (frozen) LM and Flamingo parts for
    # the input gradients, plus 2N_trainable for the weight gradients; the frozen vision tower runs forward only.
    n_text = n_total - n_vision
    image_tokens = (224 // 14) ** 2 + 1
    flops = tokens * (4 * n_text + 2 * n_train) + steps * batch_size * image_tokens * 2 * n_vision
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops / seconds / 1e12
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else "MFU n/a (peak of this GPU unknown)"
    return (
        f"{n_total / 1e9:.2f}B params ({n_train / 1e6:.1f}M trainable), batch {batch_size}x{seq}: "
        f"{tokens / seconds:,.0f} tokens/s, {achieved:.1f} TFLOP/s, {mfu}"
    )

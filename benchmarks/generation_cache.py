"""Generation speed: media encoded once + KV cache (``Flamingo.generate``) vs re-encoding everything each step.

Both run greedy decoding on the same tiny OpenFlamingo (gates opened so the images matter) in the same
process, and must produce the same tokens. Last line: ``generation_cache_speedup=<cached / baseline>``.
Usage: .venv/bin/python benchmarks/generation_cache.py [--new-tokens 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from lavis.common.config import read_yaml
from lavis.models import build_model


def baseline_generate(model, vision_x, ids, mask, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that re-runs vision encoder, Perceiver and the whole sequence at every step."""
    seq, am = ids, mask
    for _ in range(new_tokens):
        nxt = model(vision_x, seq, am).logits[:, -1].argmax(-1, keepdim=True)
        seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    return seq[:, ids.shape[1] :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = dict(read_yaml("lavis/configs/models/openflamingo/tiny.yaml").model)
    cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in cfg.items()}
    cfg["tiny"].update(lm_hidden_size=256, lm_layers=4, lm_intermediate_size=688, vision_layers=4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    tok = model.tokenizer
    tok.padding_side = "left"
    prompt = "<image>question: what color is the circle? answer: red<|endofchunk|>" * 2 + "<image>question: how many"
    batch = tok([prompt] * args.batch, return_tensors="pt")
    vision_x = torch.randn(
        args.batch, 3, 1, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0)
    )

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    n = args.new_tokens
    t_cached, cached = timed(
        lambda: model.generate(
            vision_x, batch.input_ids, batch.attention_mask, max_new_tokens=n, min_new_tokens=n, eos_token_id=None
        )
    )
    t_base, base = timed(lambda: baseline_generate(model, vision_x, batch.input_ids, batch.attention_mask, n))
    if not torch.equal(cached, base):
        raise SystemExit("cached and re-encoding decoding produced different tokens")
    tokens = args.batch * n
    print(f"prompt length {batch.input_ids.shape[1]}, batch {args.batch}, {n} new tokens, 3 images per row")
    print(f"media+KV cache: {tokens / t_cached:.1f} tokens/s ({t_cached:.3f} s)")
    print(f"re-encode each step: {tokens / t_base:.1f} tokens/s ({t_base:.3f} s)")
    print("same tokens: True")
    print(f"generation_cache_speedup={t_base / t_cached:.2f}")


if __name__ == "__main__":
    main()

"""Cost of the Flamingo collators, side by side with a plain padded tokenizer call on the same texts.

The collator runs once per batch in the DataLoader workers; this measures what the prompt building,
label mask and padding add on top of tokenisation (the part any collator must pay) with tiny images,
compares the two label-mask methods (``offsets``: one tokenisation; ``prefix``: two), and times a
few-shot eval batch with full-size images against tokenising + stacking the same data.

Usage: .venv/bin/python benchmarks/bench_collators.py [--batch 64] [--repeats 20]
Last line: ``train_collate_vs_plain_tokenize=<ratio>`` (collator time / plain tokenizer time).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from lavis.datasets.collators import CaptionCollator
from lavis.models.flamingo.tokenizer import load_llama_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama_tokenizer"
WORDS = "a man dog cat riding horse on the beach bowl of oranges table two sofa red truck old picture".split()


def captions(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(n)]


def best_of(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    tokenizer = load_llama_tokenizer(str(TOKENIZER))
    tiny = torch.zeros(3, 2, 2)  # train part: text cost only
    image = torch.zeros(3, 224, 224)
    texts = captions(args.batch, rng)
    items = [{"image": tiny, "text_input": t, "image_id": i} for i, t in enumerate(texts)]
    full_texts = [f"<image>Output:{t}<|endofchunk|>" for t in texts]

    def plain():
        tokenizer(full_texts, padding="longest", return_tensors="pt")
        torch.stack([tiny] * args.batch)

    offsets = CaptionCollator(tokenizer, role="train", label_method="offsets")
    prefix = CaptionCollator(tokenizer, role="train", label_method="prefix")
    t_plain = best_of(plain, args.repeats)
    t_offsets = best_of(lambda: offsets(items), args.repeats)
    t_prefix = best_of(lambda: prefix(items), args.repeats)

    demo_pool = captions(args.shots * args.batch, rng)
    eval_items = [
        {
            "image": image,
            "image_id": i,
            "demos": [
                {"image": image, "text_input": demo_pool[i * args.shots + s], "image_id": -1} for s in range(args.shots)
            ],
        }
        for i in range(args.batch)
    ]
    prompts = [
        "".join(f"<image>Output:{d['text_input']}<|endofchunk|>" for d in it["demos"]) + "<image>Output:"
        for it in eval_items
    ]

    def plain_eval():
        tokenizer(prompts, padding="longest", return_tensors="pt")
        torch.stack([torch.stack([image] * (args.shots + 1))] * args.batch)

    evaluator = CaptionCollator(tokenizer, role="eval")
    t_plain_eval = best_of(plain_eval, max(3, args.repeats // 4))
    t_eval = best_of(lambda: evaluator(eval_items), max(3, args.repeats // 4))

    print(f"batch={args.batch}, best of {args.repeats}; train with 3x2x2 images, eval with 3x224x224")
    print(f"train plain tokenize+stack   {t_plain * 1e3:8.2f} ms")
    print(f"train collate (offsets)      {t_offsets * 1e3:8.2f} ms")
    print(f"train collate (prefix)       {t_prefix * 1e3:8.2f} ms")
    print(f"eval {args.shots}-shot plain         {t_plain_eval * 1e3:8.2f} ms")
    print(f"eval {args.shots}-shot collate       {t_eval * 1e3:8.2f} ms")
    print(f"label_prefix_vs_offsets={t_prefix / t_offsets:.2f}")
    print(f"eval_collate_vs_plain_tokenize={t_eval / t_plain_eval:.2f}")
    print(f"train_collate_vs_plain_tokenize={t_offsets / t_plain:.2f}")


if __name__ == "__main__":
    main()

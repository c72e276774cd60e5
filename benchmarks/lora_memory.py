"""Peak memory of LoRA vs full fine-tuning of the language model (~250M-parameter LM, batch 1).

Each side runs in its own fresh process (so neither inherits the other's allocations): it builds the
same OpenFlamingo (tiny vision tower, LLaMA hidden 1024 x 20 layers, cross-attention every 4 layers),
makes the LM trainable either fully (what a user without adapters runs: every LM weight, AdamW state for
each) or through LoRA (r 16 on the attention and MLP projections, the demo's targets; base weights
frozen), with the Perceiver and cross-attention frozen on both sides so that only the LM differs, builds
the runner's optimizer (``lavis.runners.optim.build_optimizer``), and runs 3 training steps of the
task's loss on a 1-sample, 24-token caption batch. Reported: peak RSS of the process (``ru_maxrss``)
and, when a GPU is present, ``torch.cuda.max_memory_allocated``. The losses must be finite and the
trainable parameters must have changed (asserted in the child).

Last line: ``lora_memory_ratio=<LoRA peak RSS / full fine-tuning peak RSS>``.
Usage: python benchmarks/lora_memory.py [--layers 20] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

LORA = {
    "method": "lora",
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "apply_to": ["lang_encoder"],
}
FROZEN_REST = {"perceiver": False, "gated_cross_attn": False, "new_token_embeddings": False, "lm_embeddings": False}


def child(side: str, layers: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fewshot_eval import REPO

    from lavis.common.config import read_yaml
    from lavis.models import build_model
    from lavis.runners.optim import build_optimizer
    from lavis.runners.run_config import RunConfig
    from lavis.tasks.captioning import CaptioningTask

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.to_container(read_yaml(REPO / "lavis" / "configs" / "models" / "openflamingo" / "tiny.yaml").model)
    cfg["tiny"].update(lm_hidden_size=1024, lm_layers=layers, lm_heads=16, lm_intermediate_size=2816)
    cfg.update(
        cross_attn_every_n_layers=4, trainable=FROZEN_REST, adapters=LORA if side == "lora" else {"method": None}
    )
    model = build_model(cfg)
    if side == "full":
        model.lang_encoder.requires_grad_(True)
    model.to(device).train()
    lm_params = sum(p.numel() for p in model.lang_encoder.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = OmegaConf.create(
        {
            **dataclasses.asdict(RunConfig()),
            "init_lr": 1e-4,
            "weight_decay": 0.0,
            "metrics": ["CIDEr"],
            "agg_metric": "CIDEr",
        }
    )
    optimizer = build_optimizer(model, run)
    task = CaptioningTask(OmegaConf.create({"run": run}))
    collate = task.collator(model, "train")
    item = {
        "image": torch.randn(3, model.image_size, model.image_size),
        "image_id": 1,
        "text_input": "a red circle above a small blue square on the left side of the image",
    }
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate([item]).items()}
    before = [p.detach().clone() for p in trainable[:4]]
    losses = []
    for _ in range(3):
        loss = task.train_step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable[:4])), "nothing trained"
    out = {
        "side": side,
        "lm_params": lm_params,
        "trainable": sum(p.numel() for p in trainable),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens": batch["lang_x"].shape[1],
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=["lora", "full"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for side in ("full", "lora"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", side, "--layers", str(args.layers)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if proc.returncode:
                raise SystemExit(f"{side} process failed:\n{proc.stderr[-3000:]}")
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for side, runs in results.items():
        rss = [r["peak_rss_mib"] for r in runs]
        line = (
            f"{side}: LM {runs[0]['lm_params'] / 1e6:.0f}M params, {runs[0]['trainable'] / 1e6:.2f}M trainable, "
            f"batch 1 x {runs[0]['tokens']} tokens, "
            f"peak RSS min {min(rss):.0f} MiB median {statistics.median(rss):.0f} MiB"
        )
        if "cuda_max_allocated_mib" in runs[0]:
            line += f", CUDA max allocated {statistics.median(r['cuda_max_allocated_mib'] for r in runs):.0f} MiB"
        print(line)
    ratio = statistics.median(r["peak_rss_mib"] for r in results["lora"]) / statistics.median(
        r["peak_rss_mib"] for r in results["full"]
    )
    if "cuda_max_allocated_mib" in results["full"][0]:
        cuda = statistics.median(r["cuda_max_allocated_mib"] for r in results["lora"]) / statistics.median(
            r["cuda_max_allocated_mib"] for r in results["full"]
        )
        print(f"lora_cuda_memory_ratio={cuda:.2f}")
    print(f"lora_memory_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()

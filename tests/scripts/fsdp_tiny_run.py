"""Train the real tiny OpenFlamingo through the runner under torchrun (or alone), for tests/test_runner_fsdp.py.

Usage: [torchrun --nproc_per_node=2] fsdp_tiny_run.py OUT_DIR PLAN
PLAN "compare", in one process group:
- six runs of 10 steps: ddp and fsdp, with LoRA, with full fine-tuning of the LM and with AdaLoRA. Rank 0 writes
  OUT_DIR/<strategy>_<trainable>.pt (the gathered trainable weights), every rank OUT_DIR/rank<r>.json
  (frozen weights bitwise unchanged and without gradient, run summaries);
- under fsdp, the gradients of one batch with and without activation checkpointing (OUT_DIR/ac_grads.pt);
- last, run "resumed": the fsdp LoRA run again, SIGKILLed (every rank) in step 7, after its step-4 checkpoint.
PLAN "resume": that run resumed from its latest checkpoint.
PLAN "reshard": run "resharded" (a copy of the killed run's folder) resumed, typically by one process, to step 6;
rank 0 writes OUT_DIR/reshard_loaded.pt: the full weights and optimizer state right after loading.
"""

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from test_training_hooks import CaptionLikeDataset, CaptionLikeTask, tiny_model  # noqa: E402
from toy_components import make_cfg  # noqa: E402

from lavis.common.registry import registry  # noqa: E402
from lavis.runners.runner import RunnerBase  # noqa: E402
from lavis.tasks.base import GenerationConfig  # noqa: E402

out_dir, plan = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("RANK", "0"))
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
ADALORA = {
    "method": "adalora",
    "r": 4,
    "target_r": 2,
    "alpha": 8,
    "dropout": 0.0,
    "total_step": 10,
    "tinit": 2,
    "tfinal": 2,
    "deltaT": 1,
    "target_modules": ["q_proj", "v_proj"],
}
TRAINABLE = {
    "lora": {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": False, "lm_embeddings": False},
    "full": {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": False, "lang_encoder": True},
}
TRAINABLE["adalora"] = TRAINABLE["lora"]
# Per-process batch 2, 2 micro-batches per step, 2 processes: 8 samples a step, 10 steps.
RUN = dict(
    batch_size_train=2,
    accum_grad_iters=2,
    max_epoch=1,
    warmup_steps=2,
    init_lr=2e-3,
    max_grad_norm=0.5,
    weight_decay=0.01,
    save_freq_steps=4,
    save_epoch_end=False,
    keep_last=3,
    valid_splits=["val"],
    best_metric="n",
    batch_size_eval=3,
    max_new_tokens=4,
    num_beams=1,
    min_new_tokens=0,
    length_penalty=1.0,
)
N_TRAIN = 80


class ValidatingTask(CaptionLikeTask):
    """Training as CaptionLikeTask; validation generates a few tokens per sample (under fsdp: synced ranks)."""

    @dataclass
    class Config(GenerationConfig):
        def metric_names(self) -> list[str]:
            return ["agg_metrics", "n", "chars"]

    kill_in_call = None
    calls = 0

    def train_step(self, model, batch):
        self.calls += 1
        if self.calls == self.kill_in_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(model, batch)

    def valid_step(self, model, batch):
        texts = self.generate_text(model, batch)
        return [{"sample_id": i, "text": t} for i, t in zip(batch["sample_id"], texts)]

    def evaluate(self, records, split, dataset, result_dir):
        return {"agg_metrics": float(len(records)), "n": len(records), "chars": sum(len(r["text"]) for r in records)}


def frozen_report(runner, reference: dict) -> dict:
    """Frozen weights of the trained model vs their copies taken before training: bitwise equal, and never
    given a gradient."""
    from torch.distributed.tensor import DTensor

    changed, with_grad, n = [], [], 0
    for name, p in runner.model.named_parameters():
        if p.requires_grad:
            continue
        n += 1
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if not torch.equal(full.detach(), reference[name]):
            changed.append(name)
        if p.grad is not None:
            with_grad.append(name)
    return {"frozen": n, "changed": changed, "with_grad": with_grad}


def checkpointing_gradients(runner) -> list[str]:
    """Under fsdp, one batch's gradients with activation checkpointing vs without: rank 0 saves both."""
    from torch.distributed.tensor import DTensor

    from lavis.runners.strategy import FSDPStrategy

    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model(adapters=LORA, trainable=TRAINABLE["full"])
        model.set_gradient_checkpointing(checkpointing)
        model = FSDPStrategy(runner.run_cfg, runner.precision, runner.dist_info).wrap(model)
        model.train()
        dataset = CaptionLikeDataset(4, model.image_size, seed=2)
        batch = runner.task.collator(model, "train")([dataset[2 * rank], dataset[2 * rank + 1]])
        runner.task.train_step(model, batch).backward()
        grads[checkpointing] = {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
    if rank == 0:
        torch.save(grads, out_dir / "ac_grads.pt")
    return sorted(grads[True])


def train(strategy: str, trainable: str, run_name: str, kill_in_call=None, **run):
    cfg = make_cfg(out_dir, run_name=run_name, strategy=strategy, **{**RUN, **run})
    torch.manual_seed(0)  # the same adapter initialisation in every run
    model = tiny_model(adapters=ADALORA if trainable == "adalora" else LORA, trainable=TRAINABLE[trainable])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    task = ValidatingTask(cfg)
    task.kill_in_call = kill_in_call
    datasets = {
        "lm": {
            "train": CaptionLikeDataset(N_TRAIN, model.image_size),
            "val": CaptionLikeDataset(5, model.image_size, seed=1),
        }
    }
    runner = registry.get("runner", cfg.run.runner)(cfg, task, model, datasets)
    summary = runner.train()
    weights = runner.strategy.gather_trainable_state_dict(runner.model)
    report = frozen_report(runner, frozen)
    from lavis.models.adapters import peft_models

    report["rank_pattern"] = [
        next(iter(w.peft_config.values())).rank_pattern for w in peft_models(runner.model).values()
    ]
    return runner, summary, weights, report


results = {}
if plan == "compare":
    for trainable in ("lora", "full", "adalora"):
        for strategy in ("ddp", "fsdp"):
            key = f"{strategy}_{trainable}"
            runner, summary, weights, report = train(strategy, trainable, key)
            results[key] = {"summary": summary, **report}
            if rank == 0:
                torch.save(weights, out_dir / f"{key}.pt")
    results["ac_grads"] = checkpointing_gradients(runner)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, default=str))
    # Call 13 is the first micro-batch of step 7 (2 micro-batches a step): after the step-4 checkpoint.
    train("fsdp", "lora", "resumed", kill_in_call=13)
elif plan == "resume":
    runner, summary, weights, report = train("fsdp", "lora", "resumed", resume_ckpt_path="latest")
    results["resumed"] = {"summary": summary, **report}
    if rank == 0:
        torch.save(weights, out_dir / "resume.pt")
    (out_dir / f"resume_rank{rank}.json").write_text(json.dumps(results, default=str))
elif plan == "reshard":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    real_resume = RunnerBase._resume

    def snapshot_resume(self, path):
        real_resume(self, path)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        flat = {f"{name}.{key}": t for name, entry in optim["state"].items() for key, t in entry.items()}
        weights = self.strategy.gather_trainable_state_dict(self.model)
        if rank == 0:
            torch.save({"model": weights, "optimizer": flat}, out_dir / "reshard_loaded.pt")

    RunnerBase._resume = snapshot_resume
    runner, summary, weights, report = train("fsdp", "lora", "resharded", resume_ckpt_path="latest", max_steps=6)
    if rank == 0:
        (out_dir / "resharded.json").write_text(json.dumps({"summary": summary, **report}, default=str))
runner.close()

"""The checks that need a CUDA GPU, run by benchmarks/gpu_check.sh (torchrun, one process, nccl).

Every model is random and built in process (no downloads). Each check prints one line, ``ok``, ``FAIL`` or
``skip`` (a missing optional package), with its figures; then a summary. Checks:
nccl DDP; FSDP through the runner with a sharded save, a resume and an evaluation; fp16 with the GradScaler
(skipped steps counted); bf16 (fp32 master weights); SDPA vs eager attention parity; 8-bit and 4-bit frozen LM
through bitsandbytes (load, forward, one LoRA step); throughput of a LoRA step on a ~1B-parameter random
OpenFlamingo in bf16 (tokens/s and model FLOPs utilisation against the GPU's peak).

The helpers every check uses (``Skip``, ``model_cfg``, ``batch_for``, ``train_runner``, ``WORK``) are in
gpu_checks/common.py, the throughput check in gpu_checks/throughput.py; this script holds the other checks and
runs them all.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_checks.common import TINY_YAML, TRAIN_PARTS, WORK, Skip, batch_for, model_cfg, train_runner  # noqa: E402
from gpu_checks.throughput import check_throughput  # noqa: E402

from lavis.common.config import read_yaml  # noqa: E402
from lavis.models import build_model  # noqa: E402

# --- the checks: each returns its figures as a short string, or raises -------------------------------------


def check_nccl_ddp() -> str:
    from lavis.common.dist import wrap_ddp

    assert tdist.get_backend() == "nccl", tdist.get_backend()
    torch.manual_seed(0)
    model = build_model(model_cfg()).cuda()
    ddp = wrap_ddp(model, torch.device("cuda", 0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = batch_for(model, 4)
    losses = []
    for _ in range(4):
        loss = ddp(batch["vision_x"], batch["lang_x"], batch["attention_mask"], batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over 4 steps"


def check_fsdp_save_resume_evaluate() -> str:
    from lavis.runners import sharded_checkpoint as sharded

    # bf16 where the GPU has it: FSDP's MixedPrecisionPolicy gathers the bf16-stored frozen weights and the
    # fp32 trainable ones in bf16.
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    amp, dtype, tolerance = ("bf16", "bfloat16", 1e-3) if bf16 else ("fp32", "float32", 1e-4)

    def build():
        torch.manual_seed(0)
        return build_model(model_cfg(frozen_dtype=dtype))

    runner, summary = train_runner("fsdp", amp, model=build(), strategy="fsdp", save_freq_steps=3, keep_last=5)
    final = runner.strategy.gather_trainable_state_dict(runner.model)
    step3 = sharded.step_checkpoint_dir(runner.paths.run_dir, 3)
    assert sharded.is_sharded_checkpoint(step3), step3
    resumed_dir = WORK / "fsdp_resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(step3, resumed_dir / step3.name)
    again, _ = train_runner(
        "fsdp_resumed", amp, model=build(), strategy="fsdp", save_freq_steps=3, resume_ckpt_path="latest"
    )
    resumed = again.strategy.gather_trainable_state_dict(again.model)
    diff = max((final[k] - resumed[k]).abs().max().item() for k in final)
    assert diff < tolerance, f"resumed run differs by {diff}"
    last = sharded.step_checkpoint_dir(runner.paths.run_dir, summary["step"])
    _, evaluated = train_runner(
        "fsdp_eval", amp, model=build(), strategy="fsdp", evaluate=True, resume_ckpt_path=str(last)
    )
    n = evaluated["test"]["val"]["lm"]["n"]
    assert n == 5, evaluated
    return f"{amp}, {summary['step']} steps, resumed from step 3 (max |diff| {diff:.1e}), evaluated {n} samples"


def check_fp16_grad_scaler(strategy: str) -> str:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    base = ShardedGradScaler if strategy == "fsdp" else torch.amp.GradScaler

    class CountingScaler(base):
        skipped = taken = 0

        def update(self, new_scale=None):
            before = self.get_scale()
            super().update(new_scale)
            if self.get_scale() < before:
                CountingScaler.skipped += 1
            else:
                CountingScaler.taken += 1

    torch.manual_seed(0)
    model = build_model(model_cfg(frozen_dtype="float16"))
    cfg_run = dict(amp="fp16", max_epoch=2, strategy=strategy)
    from lavis.runners.runner import RunnerBase

    real = RunnerBase.train

    def train_with_counting_scaler(self):
        # 2^24 overflows fp16 gradients at first: the scaler must skip those steps and lower the scale.
        self.strategy.grad_scaler = lambda: CountingScaler("cuda", init_scale=2.0**24)
        return real(self)

    RunnerBase.train = train_with_counting_scaler
    try:
        runner, summary = train_runner(f"fp16_{strategy}", model=model, **cfg_run)
    finally:
        RunnerBase.train = real
    masters = {p.dtype for p in runner.model.parameters() if p.requires_grad}
    assert masters == {torch.float32}, masters
    assert isinstance(runner.scaler, base), type(runner.scaler)
    assert CountingScaler.skipped > 0 and CountingScaler.taken > 0, (CountingScaler.skipped, CountingScaler.taken)
    return (
        f"{summary['step']} steps: {CountingScaler.skipped} skipped by the GradScaler, {CountingScaler.taken} "
        f"taken, final scale {runner.scaler.get_scale():.0f}"
    )


def check_bf16() -> str:
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise Skip("this GPU has no native bf16")
    torch.manual_seed(0)
    runner, summary = train_runner("bf16", amp="bf16", model=build_model(model_cfg(frozen_dtype="bfloat16")))
    trains = {p.dtype for p in runner.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in runner.model.lang_encoder.parameters() if not p.requires_grad}
    assert trains == {torch.float32} and frozen == {torch.bfloat16}, (trains, frozen)
    return f"{summary['step']} steps, trainable fp32 (master), frozen LM bf16"


def check_sdpa_vs_eager() -> str:
    torch.manual_seed(0)
    model = build_model(model_cfg()).cuda().eval()
    batch = batch_for(model, 4)
    batch["attention_mask"][0, -3:] = 0  # padding exercises the mask path
    out = {}
    for impl in ("sdpa", "eager"):
        model.lang_encoder.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model(batch["vision_x"], batch["lang_x"], batch["attention_mask"]).logits.float()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out[impl + "_bf16"] = model(batch["vision_x"], batch["lang_x"], batch["attention_mask"]).logits.float()
    keep = batch["attention_mask"].bool()
    fp32 = (out["sdpa"] - out["eager"])[keep].abs().max().item()
    bf16 = (out["sdpa_bf16"] - out["eager_bf16"])[keep].abs().max().item()
    assert fp32 < 1e-4 and bf16 < 0.1, (fp32, bf16)
    return f"max |logit diff| fp32 {fp32:.1e}, bf16 {bf16:.1e}"


def _random_lm_dir(vocab: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = WORK / "random_llama"
    if not path.is_dir():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
        )
        LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def check_bitsandbytes(bits: str) -> str:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes is not installed (pip install bitsandbytes)") from None
    from lavis.models.flamingo.tokenizer import build_tiny_tokenizer

    vocab = len(build_tiny_tokenizer(read_yaml(TINY_YAML).model.tiny.tokenizer_vocab_size))
    torch.manual_seed(0)
    model = build_model(
        model_cfg(
            lang_encoder_path=_random_lm_dir(vocab),
            quantization=bits,
            frozen_dtype="float16",
            cross_attn_every_n_layers=2,
            trainable={**TRAIN_PARTS, "lm_embeddings": False},
        )
    )
    model.perceiver.cuda()
    model.gated_cross_attn_layers.cuda()
    model.vision_encoder.cuda()
    kinds = {type(m).__name__ for m in model.lang_encoder.modules()}
    assert kinds & {"Linear8bitLt", "Linear4bit"}, kinds
    batch = batch_for(model, 2)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(batch["vision_x"], batch["lang_x"], batch["attention_mask"], batch["labels"]).loss
    loss.backward()
    optimizer.step()
    moved = sum(not torch.equal(p.detach(), lora[n]) for n, p in model.named_parameters() if n in lora)
    assert torch.isfinite(loss) and moved == len(lora), (loss, moved, len(lora))
    peak = torch.cuda.max_memory_allocated() / 2**20
    return f"loss {loss.item():.3f}, {moved} LoRA tensors updated, {peak:.0f} MiB peak"


CHECKS = [
    ("nccl DDP (1 GPU)", check_nccl_ddp),
    ("FSDP (nccl) save / resume / evaluate", check_fsdp_save_resume_evaluate),
    ("fp16 + GradScaler (ddp)", lambda: check_fp16_grad_scaler("ddp")),
    ("fp16 + ShardedGradScaler (fsdp)", lambda: check_fp16_grad_scaler("fsdp")),
    ("bf16", check_bf16),
    ("SDPA vs eager attention", check_sdpa_vs_eager),
    ("bitsandbytes 8-bit frozen LM", lambda: check_bitsandbytes("8bit")),
    ("bitsandbytes 4-bit frozen LM", lambda: check_bitsandbytes("4bit")),
    ("throughput: LoRA step, ~1B OpenFlamingo, bf16", check_throughput),
]


def main() -> int:
    """Run every check; the number of failures."""
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch on this machine: the GPU checks cannot run")
        return 0
    import lavis.runners  # noqa: F401
    import lavis.tasks  # noqa: F401  (registers the runners and tasks)

    torch.cuda.set_device(0)
    tdist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    print(
        f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    counts = {"ok": 0, "FAIL": 0, "skip": 0}
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            detail, status = check(), "ok"
        except Skip as reason:
            detail, status = str(reason), "skip"
        except Exception as err:  # noqa: BLE001 - reported as FAIL with its traceback tail
            detail, status = f"{type(err).__name__}: {err}".splitlines()[0][:300], "FAIL"
            traceback.print_exc(limit=3)
        counts[status] += 1
        print(f"{status:4s} {name}: {detail} [{time.perf_counter() - start:.1f} s]", flush=True)
        torch.cuda.empty_cache()
    print(f"summary: {counts['ok']} ok, {counts['FAIL']} FAIL, {counts['skip']} skipped of {len(CHECKS)} checks")
    tdist.destroy_process_group()
    shutil.rmtree(WORK, ignore_errors=True)
    return counts["FAIL"]


if __name__ == "__main__":
    sys.exit(main())

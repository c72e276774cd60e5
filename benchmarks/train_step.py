"""Training: a reference-faithful OpenFlamingo step vs a whole train.py iteration (data included), ~40M model.

Same model (the ~40M OpenFlamingo of fewshot_eval.py: LLaMA 512 x 8, ViT width 256 on 64 px,
cross-attention every 4 layers, v2 masking), same trainable set (Perceiver, cross-attention blocks, the
<image>/<|endofchunk|> embedding rows), same shapes caption samples (8 single-image samples per step),
AdamW lr 1e-4, gradient clipping at 1.0, fp32, one thread.

- **reference**: OpenFlamingo v1's ``train_one_epoch`` step, written from its behaviour, on batches
  already collated in memory (so it pays no data loading at all): forward with the release's attention
  formulas (keys/values and the dense masked softmax over every image, the explicit-softmax Perceiver;
  the vision tower and Perceiver on every image slot of ``vision_x``, a shorter row's padding included),
  backward, the gradient of every embedding row but <image> and <|endofchunk|> zeroed, clip_grad_norm_,
  AdamW step, zero_grad.
- **project**: ``RunnerBase.train()`` as train.py runs it, with the captioning task, the real dataset
  (images read and processed from disk), the loader defaults of lavis.runners.data, the schedule,
  logging every 10 steps and the run directory. The time of a step is taken between two consecutive
  ``train_step`` calls, so everything between steps (data, collation, optimizer, logging) is counted.
  Its forward asks for the loss alone (``loss_only``): the output head and the cross-entropy run only at
  the positions that predict a label, the LM only up to the last of them; and the image slots past a
  row's <image> count (padding) skip the vision tower and the Perceiver (same loss and gradients).

Two workloads: single-image samples (the default) and, with ``--max-shots K``, what train.py trains with
``run.train_max_shots: K`` (the demo recipe: K = 4): each sample preceded by 0..K random demonstrations of
the same split (``InContextTrainingDataset``), the interleaved sequences OpenFlamingo trains on; both sides
read the same wrapped dataset, so the reference's batches hold the same demonstrations.

``--group-by-length`` (the demo recipe's ``run.group_by_length: true``): the project's steps hold samples
of similar size, the reference's are random, as OpenFlamingo's loader makes them, so the two sides train the
same samples in other batches. Then both train on the first ``steps x 8`` samples only, for 2 epochs and one
step, and the time of a step is the mean over the whole second epoch (the same samples on both sides); the
check is that the project's first loss equals the reference's formulas on the project's first batch.

The arithmetic of both sides on the same first batches (matmul, convolution and attention FLOPs of forward +
backward, torch's ``FlopCounterMode``) is printed too: its ratio is the speed-up at equal FLOP rates, so it says
how much of a speed-up comes from doing less work and how much from doing it faster. So is each side's FLOP
rate next to this core's float32 GEMM rate (a 1024 x 1024 matmul), and the ceiling: the speed-up the project
would have if its arithmetic ran at the GEMM rate and nothing else took time. Last, the project's
arithmetic is timed op by op on the same batches (the CPU time inside exactly the ops counted): the speed-up
it would have if nothing but those ops took time, at the rates they run at for these shapes.

Times are the CPU time of the process (``num_workers: 0``, one thread: all the work of both sides runs in
this process, so CPU time is the work done and stays meaningful on a shared, loaded machine).
Runs alternate (reference, project, ...); min and median of the per-step times of the repeats.
The losses of the first steps must agree (same samples in the same order on both sides, asserted to 1e-4).
Last line: ``train_step_speedup=<reference s/step / project s/step, medians>`` (``train_step_<K>shot_speedup``
with ``--max-shots K``).
Usage: python benchmarks/train_step.py [--steps 20] [--repeats 3] [--max-shots 0] [--group-by-length]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fewshot_eval import build, reference_computation  # noqa: E402

from lavis.datasets.builders.shapes import ShapesCaptionBuilder  # noqa: E402
from lavis.datasets.fewshot import InContextTrainingDataset  # noqa: E402
from lavis.datasets.samples import DatasetView  # noqa: E402
from lavis.runners.data import TrainStream  # noqa: E402
from lavis.runners.run_config import RunConfig  # noqa: E402
from lavis.runners.runner import RunnerBase  # noqa: E402
from lavis.tasks.captioning import CaptioningTask  # noqa: E402

BATCH = 8
TRAINABLE = {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": True, "lm_embeddings": False}


def model_40m():
    return build("40m", "v2", trainable=TRAINABLE)


class FirstSamples(DatasetView):
    """The first ``n`` samples of a training split (their demonstrations still come from the whole split)."""

    def __init__(self, base, n: int):
        super().__init__(base)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.base[index]

    def image_counts(self) -> list[int]:
        return self.base.image_counts()[: self.n]


class Stamped(CaptioningTask):
    """The captioning task, recording the time and loss of every train_step call (and the first batch)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.first_batch = None

    def train_step(self, model, batch):
        self.stamps.append(time.process_time())
        if self.first_batch is None:
            self.first_batch = batch
        loss = super().train_step(model, batch)  # summed over the target tokens
        if len(self.losses) < 3:
            self.losses.append(float(loss.detach()) / self.loss_count(batch))
        return loss


def per_step(stamps: list[float], warmup: int) -> float:
    steady = stamps[warmup:]
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def second_epoch_per_step(stamps: list[float], steps: int) -> float:
    """Mean step time over the second epoch of ``steps`` steps (stamps = starts of 2 x steps + 1 steps)."""
    return (stamps[2 * steps] - stamps[steps]) / steps


def run_cfg(root: str, name: str, steps: int, group_by_length: bool = False) -> dict:
    run = dataclasses.asdict(RunConfig())
    run.update(
        task="captioning",
        device="cpu",
        num_workers=0,  # all the work in this process: its CPU time is the iteration's
        output_dir=root,
        run_name=name,
        batch_size_train=BATCH,
        group_by_length=group_by_length,
        max_epoch=3 if group_by_length else 1,
        max_steps=2 * steps + 1 if group_by_length else steps,
        init_lr=1e-4,
        weight_decay=0.1,
        max_grad_norm=1.0,
        log_freq=10,
        save_epoch_end=False,
        progress_bar=False,
        train_splits=["train"],
        valid_splits=[],
        test_splits=[],
        seed=0,
        metrics=["CIDEr"],
        agg_metric="CIDEr",
        num_beams=3,
        max_new_tokens=20,
        min_new_tokens=0,
        length_penalty=-2.0,
    )
    return run


def release_loss(model, batch: dict) -> torch.Tensor:
    """OpenFlamingo's training loss of ``batch``: its forward with the labels, every position's logits."""
    return model(batch["vision_x"], batch["lang_x"], batch["attention_mask"], labels=batch["labels"]).loss


def reference_loss(batch: dict) -> float:
    """The reference's loss (release formulas, full logits) of ``batch`` under the initial weights."""
    model = model_40m()
    with torch.no_grad(), reference_computation(model, beams=1):
        return float(release_loss(model, batch))


def reference_loop(model, batches: list[dict], task) -> tuple[float, list[float]]:
    embedding = model.lang_encoder.get_input_embeddings()
    keep = torch.zeros(embedding.weight.shape[0], 1, dtype=torch.bool)
    keep[[model.media_token_id, model.eoc_token_id]] = True
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    model.train()
    stamps, losses = [], []
    with reference_computation(model, beams=1):
        for batch in batches:
            stamps.append(time.process_time())
            loss = release_loss(model, batch)
            loss.backward()
            embedding.weight.grad = embedding.weight.grad * keep  # OpenFlamingo masks the old rows' gradient
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if len(losses) < 3:
                losses.append(float(loss.detach()))
    return stamps, losses


class ArithmeticTimer(TorchDispatchMode):
    """CPU time spent inside the ops that FlopCounterMode counts (matmul, convolution, attention)."""

    def __init__(self):
        super().__init__()
        self.counted = set(FlopCounterMode(display=False).flop_registry)
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in self.counted:
            return func(*args, **(kwargs or {}))
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.process_time() - start
        return out


def forward_backward(model, batches: list[dict], loss_of, mode) -> None:
    """Forward + backward of every batch under ``mode`` (a FlopCounterMode or a dispatch mode, entered once)."""
    model.train()
    with mode:
        for batch in batches:
            loss_of(model, batch).backward()
            model.zero_grad(set_to_none=True)


def work_per_step(batches: list[dict], task) -> tuple[float, float, float]:
    """Per step on the same batches: both sides' GFLOP (reference, project) and the project's CPU seconds
    inside exactly the counted ops (timed on a second pass, so no first-call allocation is timed)."""
    reference, ours = model_40m(), model_40m()
    ref_flops, our_flops, timer = FlopCounterMode(display=False), FlopCounterMode(display=False), ArithmeticTimer()
    with reference_computation(reference, beams=1):
        forward_backward(reference, batches, release_loss, ref_flops)
    forward_backward(ours, batches, task.train_step, our_flops)
    forward_backward(ours, batches, task.train_step, timer)
    n = len(batches)
    return ref_flops.get_total_flops() / n / 1e9, our_flops.get_total_flops() / n / 1e9, timer.seconds / n


def gemm_gflops(size: int = 1024, repeats: int = 20) -> float:
    """This core's float32 matrix-multiply rate (GFLOP/s of CPU time): the ceiling of any step's arithmetic."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.process_time()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.process_time() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-shots", type=int, default=0, help="0..K demonstrations before each sample")
    parser.add_argument("--group-by-length", action="store_true", help="the project with run.group_by_length")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warmup = min(5, args.steps // 5)
    grouped = args.group_by_length
    ref_steps = 2 * args.steps + 1 if grouped else args.steps
    with tempfile.TemporaryDirectory(prefix="train-bench-") as root:
        datasets = {
            "shapes_caption": ShapesCaptionBuilder(
                {
                    "shapes": {"root": str(Path(root) / "shapes"), "num_images": 400, "image_size": 64},
                    "vis_processor": {
                        "train": {"name": "clip_image_eval", "image_size": 64},
                        "eval": {"name": "clip_image_eval", "image_size": 64},
                    },
                }
            ).build_datasets()
        }
        if args.max_shots:
            split = datasets["shapes_caption"]
            split["train"] = InContextTrainingDataset(split["train"], args.max_shots, seed=0)
        if grouped:
            split = datasets["shapes_caption"]
            split["train"] = FirstSamples(split["train"], args.steps * BATCH)
        ref_times, ours_times = [], []
        for i in range(args.repeats):
            # reference: the first `steps` batches of the same stream the runner reads, collated up front
            model = model_40m()
            cfg = OmegaConf.create({"model": {}, "datasets": {}, "run": run_cfg(root, f"ref{i}", args.steps)})
            task = Stamped(cfg)
            stream = TrainStream(datasets["shapes_caption"]["train"], task.collator(model, "train"), BATCH, 1, 0, 1, 0)
            batches = [stream.next_step()[0] for _ in range(ref_steps)]
            stamps, ref_losses = reference_loop(model, batches, task)
            ref_times.append(second_epoch_per_step(stamps, args.steps) if grouped else per_step(stamps, warmup))

            model = model_40m()
            cfg = {"model": {}, "datasets": {}, "run": run_cfg(root, f"ours{i}", args.steps, grouped)}
            task = Stamped(OmegaConf.create(cfg))
            runner = RunnerBase(OmegaConf.create(cfg), task, model, datasets)
            runner.train()
            runner.close()
            ours_times.append(
                second_epoch_per_step(task.stamps, args.steps) if grouped else per_step(task.stamps, warmup)
            )
            print(
                f"repeat {i}: reference {ref_times[-1] * 1e3:.1f} ms/step, project {ours_times[-1] * 1e3:.1f} ms/step",
                flush=True,
            )
            if grouped:
                # Other batches than the reference's: the project's first one, computed the reference's way.
                ref_losses = [reference_loss(task.first_batch)]
            if not all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(ref_losses, task.losses)):
                raise SystemExit(f"first losses differ: reference {ref_losses} vs project {task.losses}")
        ref_work, our_work, our_arithmetic = work_per_step(batches[:4], task)
    r, o = statistics.median(ref_times), statistics.median(ours_times)
    gemm = gemm_gflops()
    print(
        f"work on the same batches (GFLOP/step): reference {ref_work:.1f}, project {our_work:.1f}, "
        f"ratio {ref_work / our_work:.2f}"
    )
    # The speed-up the project would reach if all of its arithmetic ran at the GEMM rate and nothing else
    # (attention, norms, optimizer, data) took any time: what no change that keeps the arithmetic can beat.
    print(
        f"arithmetic rate (GFLOP/s, median steps): reference {ref_work / r:.0f}, project {our_work / o:.0f}; "
        f"this core's float32 GEMM {gemm:.0f}; ceiling at equal work {r / (our_work / gemm):.2f}x"
    )
    # Measured, not assumed: the project's matmuls/convolutions/attention alone, at the rates they actually run
    # at for these shapes. With everything else (norms, activations, optimizer, data, logging) at zero time the
    # speed-up could be at most this; no change that keeps the arithmetic and its kernels can beat it.
    print(
        f"project's counted arithmetic alone: {our_arithmetic * 1e3:.0f} ms/step "
        f"({our_work / our_arithmetic:.0f} GFLOP/s), {our_arithmetic / o:.0%} of its step; "
        f"speed-up bound with all else free {r / our_arithmetic:.2f}x"
    )
    print(f"reference s/step: min {min(ref_times):.4f} median {r:.4f}")
    print(f"project s/step (train.py iteration, data included): min {min(ours_times):.4f} median {o:.4f}")
    name = f"train_step_{args.max_shots}shot" if args.max_shots else "train_step"
    name += "_grouped_speedup" if grouped else "_speedup"
    print(f"{name}_min={min(ref_times) / min(ours_times):.2f}")
    print(f"{name}={r / o:.2f}")


if __name__ == "__main__":
    main()

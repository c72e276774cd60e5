"""Run every CPU benchmark and write benchmarks/results.md (``make bench``).

Each benchmark runs in its own process, one after the other (never two at once, so they do not slow
each other down); its ``name=value`` lines and its summary lines are collected. The table records the
machine's load average before each run, since the machine may be shared. A script may be listed more
than once with other arguments (``fewshot_eval.py`` is split by case so that each entry fits in
5 minutes); ``--only`` selects by script stem, so ``--only fewshot_eval`` runs all of its entries.
Usage: python benchmarks/run_all.py [--only fewshot_eval,vqa_metric] [--out benchmarks/results.md]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lavis.common.fileio import atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Target:
    """A figure a benchmark must reach, ``figure op bound`` (e.g. ``fewshot_tiny_0shot_speedup >= 2``)."""

    figure: str
    op: str  # ">=" or "<="
    bound: float

    def __str__(self) -> str:
        return f"{self.figure} {self.op} {self.bound:g}"

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


def at_least(figure: str, bound: float) -> Target:
    return Target(figure, ">=", bound)


def at_most(figure: str, bound: float) -> Target:
    return Target(figure, "<=", bound)


# (script and its arguments, what it compares, the targets of issue 12)
BENCHMARKS = [
    (
        # A tiny-model pass takes 0.07-0.7 s, so its median needs more repeats to be steady on a shared machine.
        "fewshot_eval.py --models tiny --shots 0,8,32 --repeats 7",
        "few-shot captioning: OpenFlamingo's loop vs evaluate.py's pass (tiny, 0/8/32 shots)",
        (
            at_least("fewshot_tiny_0shot_speedup", 2),
            at_least("fewshot_tiny_8shot_speedup", 3),
            at_least("fewshot_tiny_32shot_speedup", 3),
        ),
    ),
    (
        "fewshot_eval.py --models 40m --shots 0,8 --repeats 3",
        "few-shot captioning as above (40M, 0/8 shots)",
        (at_least("fewshot_40m_0shot_speedup", 2), at_least("fewshot_40m_8shot_speedup", 3)),
    ),
    (
        # The reference alone takes ~115 s of CPU per run here: 2 repeats, no warm-up pass (a cold first
        # project run can only raise the project's median, never the speed-up).
        "fewshot_eval.py --models 40m --shots 32 --repeats 2 --no-warmup",
        "few-shot captioning as above (40M, 32 shots)",
        (at_least("fewshot_40m_32shot_speedup", 3),),
    ),
    (
        "train_step.py",
        "reference-faithful training step vs train.py's iteration with data (40M)",
        (at_least("train_step_speedup", 1.5),),
    ),
    (
        "train_step.py --max-shots 4 --steps 12 --repeats 2",
        "as above, samples preceded by 0-4 demonstrations (run.train_max_shots: 4, the demo recipe)",
        (at_least("train_step_4shot_speedup", 1.5),),
    ),
    (
        "train_step.py --max-shots 4 --steps 8 --repeats 2 --group-by-length",
        "as above with run.group_by_length (the demo recipe): same samples, the project's steps grouped by size",
        (at_least("train_step_4shot_grouped_speedup", 1.5),),
    ),
    (
        "runner_overhead.py",
        "runner vs bare PyTorch loop (s/step ratio)",
        (at_most("runner_overhead_ratio", 1.03),),
    ),
    (
        "lora_memory.py",
        "LoRA vs full fine-tuning of a 257M LM, peak RSS",
        (at_most("lora_memory_ratio", 0.5),),
    ),
    (
        "vqa_metric.py --repeats 2",
        "VQA accuracy from the official files vs the official algorithm, 200k questions",
        (at_least("vqa_metric_speedup", 10),),
    ),
    ("generation_cache.py", "media + KV cache vs re-encoding every step", ()),
    ("input_pipeline.py", "input pipeline vs a bare PIL/torchvision loop", ()),
    ("bench_collators.py", "collation vs plain tokenisation", ()),
    ("fsdp_memory.py", "FSDP vs DDP peak RSS per rank", ()),
    ("okvqa_stemmer.py", "OK-VQA post-processing vs stemming each answer from scratch", ()),
]
FIGURE = re.compile(r"^([A-Za-z_][\w]*)=([-+\w.]+)$")


def verdict(targets: tuple[Target, ...], figures: list[str]) -> str:
    """Either "met" or each target missed with the value printed; empty for a benchmark without a target."""
    if not targets:
        return ""
    values = dict(FIGURE.match(line).groups() for line in figures)
    missed = []
    for target in targets:
        value = values.get(target.figure)
        if value is None:
            missed.append(f"{target.figure} not printed")
        elif not target.met(float(value)):
            missed.append(f"{target.figure}={value}")
    return "**missed**: " + ", ".join(missed) if missed else "met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated script stems to run")
    parser.add_argument("--out", default=str(HERE / "results.md"))
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    sections, failed = [], []
    for entry, what, targets in BENCHMARKS:
        script, *script_args = entry.split()
        if only and Path(script).stem not in only or not (HERE / script).is_file():
            continue
        load = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *script_args],
            capture_output=True,
            text=True,
            env=env,
            cwd=HERE.parent,
            check=False,
        )
        seconds = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        figures = [line for line in lines if FIGURE.match(line)]
        summary = [line for line in lines if not FIGURE.match(line)][-12:]
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        if proc.returncode:
            failed.append(entry)
            summary += proc.stderr.splitlines()[-5:]
        result = verdict(targets, figures)
        print(
            f"== {entry}: {status}, {result or 'no target'}, {seconds:.0f} s, load {load:.1f}",
            *figures,
            sep="\n",
            flush=True,
        )
        sections.append((entry, what, targets, result, status, seconds, load, figures, summary))
    out = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (benchmarks/run_all.py) on {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPU(s); load = 1-minute load average when the benchmark started.",
        "",
        "| benchmark | compares | target | headline | target met | run | time | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry, what, targets, result, status, seconds, load, figures, _ in sections:
        headline = figures[-1] if figures else ""
        target = "; ".join(f"`{t}`" for t in targets)
        out.append(
            f"| `{entry}` | {what} | {target} | `{headline}` | {result} | {status} | {seconds:.0f} s | {load:.1f} |"
        )
    for entry, *_, figures, summary in sections:
        out += ["", f"## {entry}", "", "```", *summary, *figures, "```"]
    atomic_write_text(Path(args.out), "\n".join(out) + "\n")
    print(f"wrote {args.out}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

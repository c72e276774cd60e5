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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lavis.common.fileio import atomic_write_text  # noqa: E402

# (script and its arguments, what it compares, target)
BENCHMARKS = [
    (
        # A tiny-model pass takes 0.07-0.7 s, so its median needs more repeats to be steady on a shared machine.
        "fewshot_eval.py --models tiny --shots 0,8,32 --repeats 7",
        "few-shot captioning: OpenFlamingo's loop vs evaluate.py's pass (tiny, 0/8/32 shots)",
        ">= 3x at 8/32 shots, >= 2x at 0",
    ),
    (
        "fewshot_eval.py --models 40m --shots 0,8 --repeats 3",
        "few-shot captioning as above (40M, 0/8 shots)",
        ">= 3x at 8 shots, >= 2x at 0",
    ),
    (
        # The reference alone takes ~115 s of CPU per run here: 2 repeats, no warm-up pass (a cold first
        # project run can only raise the project's median, never the speed-up).
        "fewshot_eval.py --models 40m --shots 32 --repeats 2 --no-warmup",
        "few-shot captioning as above (40M, 32 shots)",
        ">= 3x",
    ),
    ("train_step.py", "reference-faithful training step vs train.py's iteration with data (40M)", ">= 1.5x"),
    (
        "train_step.py --max-shots 4 --steps 12 --repeats 2",
        "as above, samples preceded by 0-4 demonstrations (run.train_max_shots: 4, the demo recipe)",
        ">= 1.5x",
    ),
    (
        "train_step.py --max-shots 4 --steps 8 --repeats 2 --group-by-length",
        "as above with run.group_by_length (the demo recipe): same samples, the project's steps grouped by size",
        ">= 1.5x",
    ),
    ("runner_overhead.py", "runner vs bare PyTorch loop (s/step ratio)", "<= 1.03"),
    ("lora_memory.py", "LoRA vs full fine-tuning of a 257M LM, peak RSS", "<= 0.5x"),
    (
        "vqa_metric.py --repeats 2",
        "VQA accuracy from the official files vs the official algorithm, 200k questions",
        ">= 10x",
    ),
    ("generation_cache.py", "media + KV cache vs re-encoding every step", ""),
    ("input_pipeline.py", "input pipeline vs a bare PIL/torchvision loop", ""),
    ("bench_collators.py", "collation vs plain tokenisation", ""),
    ("fsdp_memory.py", "FSDP vs DDP peak RSS per rank", ""),
    ("okvqa_stemmer.py", "OK-VQA post-processing vs stemming each answer from scratch", ""),
]
FIGURE = re.compile(r"^([A-Za-z_][\w]*)=([-+\w.]+)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated script stems to run")
    parser.add_argument("--out", default=str(HERE / "results.md"))
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    sections, failed = [], []
    for entry, what, target in BENCHMARKS:
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
        print(f"== {entry}: {status}, {seconds:.0f} s, load {load:.1f}", *figures, sep="\n", flush=True)
        sections.append((entry, what, target, status, seconds, load, figures, summary))
    out = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (benchmarks/run_all.py) on {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPU(s); load = 1-minute load average when the benchmark started.",
        "",
        "| benchmark | compares | target | headline | status | time | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry, what, target, status, seconds, load, figures, _ in sections:
        headline = figures[-1] if figures else ""
        out.append(f"| `{entry}` | {what} | {target} | `{headline}` | {status} | {seconds:.0f} s | {load:.1f} |")
    for entry, _, _, _, _, _, figures, summary in sections:
        out += ["", f"## {entry}", "", "```", *summary, *figures, "```"]
    atomic_write_text(Path(args.out), "\n".join(out) + "\n")
    print(f"wrote {args.out}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

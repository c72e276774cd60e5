"""The evaluation suite on its synthetic stand-ins (``make demo-suite`` / ``python -m lavis.demo_suite``).

Runs evaluate.py's few-shot evaluation of the tiny OpenFlamingo (or ``--checkpoint``, e.g. the one
``make demo`` trains: its shapes vocabulary is the stand-ins') on the Flickr30k, OK-VQA, TextVQA, VizWiz,
Hateful Memes and ImageNet stand-ins, each in its own data set's file format, and prints one table. Each
run directory holds the lmms-eval-style ``results.json`` and ``samples_*.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["suite_captioning", "suite_vqa", "suite_classification", "suite_imagenet"]
METRICS = {
    "flickr30k": "CIDEr",
    "okvqa": "VQA acc (v2)",
    "textvqa": "VQA acc (v2)",
    "vizwiz": "VQA acc (v2)",
    "hateful_memes": "ROC AUC",
    "imagenet": "top-1",
}


def main(argv=None) -> int:
    """Evaluate every stand-in and print the table."""
    from lavis.cli import evaluate_main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="trainable weights to evaluate (default: the untrained tiny model)")
    parser.add_argument("--output-dir", default="output/demo_suite")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    lines = ["| data (metric) | 0-shot | 4-shot |", "|---|---|---|"]
    for name in CONFIGS:
        run_name = f"{stamp}_{name}"
        extra = ["--checkpoint", args.checkpoint] if args.checkpoint else []
        evaluate_main(
            [
                "--cfg-path",
                str(REPO / "configs" / "demo" / f"{name}.yaml"),
                *extra,
                "--options",
                f"run.output_dir={args.output_dir}",
                f"run.run_name={run_name}",
            ]
        )
        results = json.loads((Path(args.output_dir) / run_name / "results.json").read_text())
        for data, row in results["results"].items():
            metric = METRICS.get(data.split("/")[0].removeprefix("shapes_"), "agg_metrics")
            cells = [f"{row[s]['mean']:.3g}" if s in row and row[s]["mean"] is not None else "" for s in ("0", "4")]
            lines.append(f"| {data} ({metric}) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"run directories: {args.output_dir}/{stamp}_*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

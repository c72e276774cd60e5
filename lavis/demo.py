"""The embedded default (``make demo`` / ``python -m lavis.demo``): a run that visibly learns on a laptop.

1. generate the synthetic shapes data (captions and VQA in the official COCO/VQAv2 formats),
2. evaluate the untrained tiny OpenFlamingo 0-shot and few-shot,
3. fine-tune it with LoRA under torchrun (2 CPU processes, gloo),
4. evaluate the trained model the same way,
5. print the before/after table and save it in the run directory,
6. write report.html: the untrained and trained models side by side on the same validation samples.
Everything goes to one directory, named at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lavis.common.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TRAIN_CFG = REPO / "configs" / "demo" / "shapes_train.yaml"
EVAL_CFG = REPO / "configs" / "demo" / "shapes_eval.yaml"
METRIC_NAMES = {"shapes_caption": "CIDEr", "shapes_vqa": "VQA accuracy"}


def _torchrun(script: str, cfg: Path, options: list[str], nproc: int, extra: list[str] = ()) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / script),
        "--cfg-path",
        str(cfg),
        *extra,
        "--options",
        *options,
    ]
    print("+", " ".join(cmd[2:]), flush=True)
    # One thread per process: the two processes share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def _generate_data() -> None:
    """Build the shapes datasets once in this process, so the torchrun ranks find them on disk."""
    from lavis.common.config import load_config
    from lavis.common.registry import registry

    for name, section in load_config(TRAIN_CFG).datasets.items():
        registry.get("builder", name)(section).build_datasets()


def before_after_table(before: dict, after: dict) -> str:
    """Markdown: one row per (model, data set), one column per shot count."""
    shots = sorted({int(s) for table in (before, after) for row in table["rows"].values() for s in row})
    lines = [
        "| model | data (metric) | " + " | ".join(f"{s}-shot" for s in shots) + " |",
        "|" + "---|" * (len(shots) + 2),
    ]
    for label, table in (("untrained", before), ("trained", after)):
        for data, row in table["rows"].items():
            metric = METRIC_NAMES.get(data.split("/")[0], "agg_metrics")
            cells = [f"{row[str(s)]['mean']:.1f}" if row.get(str(s), {}).get("mean") is not None else "" for s in shots]
            lines.append(f"| {label} | {data} ({metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(run_dir: Path) -> None:
    """The untrained and trained models side by side on the same validation samples (lavis/report)."""
    from lavis.report import build_report

    try:
        report = build_report(run_dir / "before", out=run_dir / "report.html", compare=run_dir / "after")
    except Exception as err:  # noqa: BLE001 - the table above is the demo's result; the report is a view of it
        print(f"warning: could not write the report: {err}")
        return
    print(f"\nreport (untrained vs trained; training curves in {run_dir / 'train' / 'report.html'}): {report}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "output" / "demo"))
    parser.add_argument("--nproc", type=int, default=2, help="training/evaluation processes (torchrun)")
    args = parser.parse_args(argv)
    start = time.time()
    run_dir = Path(args.output_dir).resolve() / time.strftime("%Y%m%d_%H%M%S")
    common = [f"run.output_dir={run_dir}"]
    try:
        print("== 1/4 synthetic shapes data", flush=True)
        _generate_data()
        print("== 2/4 untrained model, 0-shot and 4-shot", flush=True)
        _torchrun("evaluate.py", EVAL_CFG, [*common, "run.run_name=before"], args.nproc)
        print("== 3/4 fine-tuning (LoRA + perceiver + cross-attention)", flush=True)
        _torchrun("train.py", TRAIN_CFG, [*common, "run.run_name=train"], args.nproc)
        from lavis.runners.checkpoint import latest_checkpoint

        trained = latest_checkpoint(run_dir / "train")
        print("== 4/4 trained model, 0-shot and 4-shot", flush=True)
        _torchrun(
            "evaluate.py", EVAL_CFG, [*common, "run.run_name=after"], args.nproc, extra=["--checkpoint", str(trained)]
        )
    except UserError as err:
        sys.exit(f"error: {err}")
    except subprocess.CalledProcessError as err:
        sys.exit(f"error: a demo step failed ({err}); see the output above and {run_dir}")
    before = json.loads((run_dir / "before" / "fewshot_table.json").read_text())
    after = json.loads((run_dir / "after" / "fewshot_table.json").read_text())
    table = before_after_table(before, after)
    (run_dir / "before_after.md").write_text(table + "\n")
    print("\n" + table)
    _report(run_dir)
    print(f"\ndemo finished in {time.time() - start:.0f} s; everything is in {run_dir}")


if __name__ == "__main__":
    main()

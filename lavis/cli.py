"""The logic behind train.py and evaluate.py (the scripts themselves are thin)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from lavis.common.errors import UserError
from lavis.common.preflight import missing_files, raw_config


def _parser(description: str, checkpoint: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="project YAML (see configs/)")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. run.init_lr=1e-4 model.model_type=tiny (values parsed as YAML)",
    )
    if checkpoint:
        parser.add_argument(
            "--checkpoint", default=None, help="checkpoint to evaluate (default: the configured pretrained model)"
        )
    return parser


@contextlib.contextmanager
def user_errors():
    """A user's mistake ends the program with one line and exit code 2; a bug keeps its traceback."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def prepare_process() -> None:
    """Console logging and this rank's GPU, before anything is built.

    The model is built before the runner joins the process group; a quantized LM is placed on
    ``torch.cuda.current_device()``, so every rank must select its own GPU first.
    """
    import torch

    from lavis.common.logging import setup_logging

    setup_logging(int(os.environ.get("RANK", "0")))
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def structure_from_checkpoint(cfg, checkpoint: str) -> None:
    """Give ``cfg.model`` the adapters and trainable parts a training checkpoint was made with.

    A checkpoint holds only the trainable weights, named after the adapters that produced them; an
    evaluation config written for the pretrained model would otherwise build a different set.
    """
    from omegaconf import OmegaConf

    from lavis.common.logging import get_logger
    from lavis.runners.checkpoint import load_checkpoint

    trained = (load_checkpoint(checkpoint).get("config") or {}).get("model") or {}
    for key in ("adapters", "trainable"):
        if key in trained and OmegaConf.to_container(cfg.model[key]) != trained[key]:
            get_logger().info("model.%s taken from the checkpoint %s: %s", key, checkpoint, trained[key])
            cfg.model[key] = trained[key]


def build_components(cfg, raw: dict | None = None):
    """(task, model, datasets) for a validated config, with the run's seed fixed first.

    Missing model files and missing data files are reported together, in one message
    that names each key, the path and how to set it, so that a researcher setting up a
    real run learns every path to fix at once. ``raw`` is :func:`raw_config`'s output.
    """
    import torch

    from lavis.common.errors import ConfigError
    from lavis.common.registry import registry

    # The same seed on every rank gives every rank the same initial weights of the trainable parts.
    torch.manual_seed(cfg.run.seed)
    task = registry.get("task", cfg.run.task).setup_task(cfg)
    model = datasets = None
    model_missing, data_missing = missing_files(cfg, raw)
    problems = model_missing + data_missing
    # A part whose files are missing is not built: its builder would only report the first of them.
    if not model_missing:
        try:
            model = task.build_model(cfg.model)
        except UserError as err:
            problems.append(str(err))
    if not data_missing:
        try:
            datasets = task.build_datasets(cfg.datasets)
        except UserError as err:
            problems.append(str(err))
    if problems:
        if model_missing or data_missing:
            head = f"{len(model_missing) + len(data_missing)} file(s) or path(s) needed by this config are missing"
            raise ConfigError(head + ":\n  - " + "\n  - ".join(problems))
        raise ConfigError("\n".join(problems))
    return task, model, datasets


def train_main(argv=None) -> None:
    """``train.py --cfg-path CFG [--options ...]``: train, validate and test as the config says."""
    args = _parser("Fine-tune a model as a YAML project config says.", checkpoint=False).parse_args(argv)
    with user_errors():
        from lavis.common.config import load_config
        from lavis.common.registry import registry

        cfg = load_config(args.cfg_path, args.options)
        prepare_process()
        task, model, datasets = build_components(cfg, raw_config(args.cfg_path, args.options))
        runner = registry.get("runner", cfg.run.runner)(cfg, task, model, datasets)
        try:
            summary = runner.train()
        finally:
            runner.close()
        from lavis.report import report_after_run

        report_after_run(summary["run_dir"], summary["status"])


def evaluate_main(argv=None) -> None:
    """``evaluate.py --cfg-path CFG [--checkpoint PATH]``: few-shot evaluation and its table."""
    args = _parser("Evaluate a checkpoint (or the pretrained model) few-shot.", checkpoint=True).parse_args(argv)
    with user_errors():
        from lavis.common.config import load_config
        from lavis.runners.fewshot_eval import run_fewshot_evaluation

        cfg = load_config(args.cfg_path, args.options)
        # Demonstrations and queries are shown as at test time: no split gets training augmentation
        # or in-context training demonstrations.
        for section in cfg.datasets.values():
            section.train_splits = []
        cfg.run.train_max_shots = 0
        prepare_process()
        if args.checkpoint:
            structure_from_checkpoint(cfg, args.checkpoint)
        task, model, datasets = build_components(cfg, raw_config(args.cfg_path, args.options))
        from lavis.common import dist

        finished = False
        try:
            run_fewshot_evaluation(cfg, task, model, datasets, checkpoint=args.checkpoint)
            finished = True
        finally:
            # After an error, peers may be dead or stuck: leave at once instead of waiting at a barrier.
            dist.destroy(wait=finished)

"""The logic behind train.py and evaluate.py (the scripts themselves are thin)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

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
            "--checkpoint",
            default=None,
            help="step_*.pt, best.pt, a run directory (its best, else latest), a peft adapter folder or an "
            "OpenFlamingo checkpoint.pt (default: the configured pretrained model)",
        )
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged, validated config (YAML) and exit"
    )
    return parser


def print_config(cfg) -> None:
    """The merged, validated config as YAML on stdout (``--print-config``)."""
    from lavis.common.config import to_yaml

    print(to_yaml(cfg), end="")


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


def adopt_checkpoint_structure(cfg, checkpoint: str):
    """Give ``cfg.model`` what ``checkpoint`` was trained as; returns the resolved checkpoint.

    A training checkpoint holds only the trainable weights, named after the adapters that produced them; an
    evaluation config written for the pretrained model would otherwise build a different set. An
    OpenFlamingo checkpoint.pt becomes ``model.pretrained_checkpoint_path``. See lavis/models/trained.py.
    """
    from omegaconf import OmegaConf

    from lavis.common.logging import get_logger
    from lavis.common.registry import registry
    from lavis.common.schema import config_instance
    from lavis.models.trained import describe_structure, model_section_for, resolve_checkpoint

    trained = resolve_checkpoint(checkpoint)
    configured = OmegaConf.to_container(cfg.model, resolve=True)
    section = model_section_for(trained, configured)
    log = get_logger()
    if trained.kind == "openflamingo":
        log.info(
            "%s: an OpenFlamingo checkpoint.pt, used as model.pretrained_checkpoint_path (the same as "
            "--options model.pretrained_checkpoint_path=%s)",
            trained.path,
            trained.path,
        )
    changed = [key for key in section if section[key] != configured.get(key)]
    if changed:
        # The section is rebuilt through the model Config (a structured node): the checkpoint's keys replace
        # the configured ones whole, and are validated like the loader's.
        schema = registry.get("model", configured["arch"], key_path="model.arch").Config
        cfg.model = OmegaConf.structured(config_instance(schema, {**configured, **section}, "model"))
        log.info("model from the checkpoint %s: %s", trained.path, describe_structure(section))
    return trained


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
        if args.print_config:
            print_config(cfg)
            return
        prepare_process()
        task, model, datasets = build_components(cfg, raw_config(args.cfg_path, args.options))
        runner = registry.get("runner", cfg.run.runner)(cfg, task, model, datasets)
        try:
            summary = runner.train()
        finally:
            runner.close()
        from lavis.report import report_after_run

        report_after_run(summary["run_dir"], summary["status"])


def evaluation_run_name(cfg_path: str, trained) -> str:
    """``eval_<config>_<checkpoint>``: the run directory name of an evaluation that was not given one."""
    if trained is None:
        label = "pretrained"
    elif trained.kind == "training" and trained.path.parent.name == "checkpoints":
        label = f"{trained.path.parent.parent.name}_{trained.path.stem}"
    elif trained.kind == "openflamingo":
        label = f"{trained.path.parent.name}_{trained.path.stem}"
    else:
        label = trained.path.name
    return f"eval_{Path(cfg_path).stem}_{label}"


def _set_evaluation_run_dir(cfg, args, trained) -> Path:
    """Point ``cfg.run`` at a fresh run directory of this evaluation (never a training run's), on every rank.

    ``--options run.run_name=NAME`` is used as given (an existing folder is an error). A ``run.run_name``
    of the config is used when that folder is free; when it is taken (evaluating with the training
    config), or when there is none, the name is ``eval_<config>_<checkpoint>``, with ``_1``, ``_2``...
    when taken. Rank 0 decides and tells the others.
    """
    from lavis.common import dist
    from lavis.common.errors import ConfigError
    from lavis.common.logging import get_logger

    # A training config's resume setting describes the training run, not this evaluation.
    cfg.run.resume_ckpt_path = None
    given = any(option.split("=", 1)[0] == "run.run_name" for option in args.options)
    output_dir = Path(cfg.run.output_dir).expanduser().resolve()
    dist.init_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    decided = None
    if dist.is_main_process():
        name = cfg.run.run_name
        if name and _same_evaluation(output_dir / name, cfg, trained):
            decided = {"name": name}  # re-running the same evaluation continues it (lavis.runners.eval_cache)
        elif given and (output_dir / name).exists():
            decided = {
                "error": (
                    f"run.run_name: {output_dir / name} already exists; evaluate.py never writes into an existing "
                    f"directory: choose another run.run_name, or leave it out for a fresh eval_* folder"
                )
            }
        elif name and not (output_dir / name).exists():
            decided = {"name": name}
        else:
            base = evaluation_run_name(args.cfg_path, trained)
            name, n = base, 1
            while (output_dir / name).exists() and not _same_evaluation(output_dir / name, cfg, trained):
                name, n = f"{base}_{n}", n + 1
            if cfg.run.run_name:
                get_logger().info(
                    "run.run_name %r is taken (%s): this evaluation writes to %s",
                    cfg.run.run_name,
                    output_dir / cfg.run.run_name,
                    output_dir / name,
                )
            decided = {"name": name}
    decided = dist.broadcast_object(decided)
    if "error" in decided:
        raise ConfigError(decided["error"])
    cfg.run.run_name = decided["name"]
    return output_dir / decided["name"]


def _same_evaluation(run_dir: Path, cfg, trained) -> bool:
    """Whether ``run_dir`` holds an unfinished or finished evaluation of exactly this model, checkpoint and task."""
    import json

    from lavis.runners.eval_cache import CACHE_DIR
    from lavis.runners.fewshot_eval import evaluation_fingerprints

    stamp = run_dir / CACHE_DIR / "fingerprint.json"
    if not stamp.is_file():
        return False
    return json.loads(stamp.read_text()).get("fingerprint") == evaluation_fingerprints(cfg, trained)[1]


def _clean_failed_evaluation(run_dir: Path, err: BaseException, keep: bool = False) -> None:
    """Remove the run directory of an evaluation that failed before any result; mark one that has some.

    Results, a table or cached responses (which a re-run continues from) count as results.
    """
    import shutil

    from lavis.common import dist
    from lavis.common.fileio import atomic_write_text
    from lavis.common.logging import close_logging
    from lavis.runners.eval_cache import CACHE_DIR

    if not dist.is_main_process() or not run_dir.is_dir():
        return
    close_logging()  # log.txt is open in there
    results = run_dir / "results"
    cache = run_dir / CACHE_DIR
    written = (
        (results.is_dir() and any(results.iterdir()))
        or (run_dir / "fewshot_table.json").exists()
        or (cache.is_dir() and any(p.name != "fingerprint.json" for p in cache.iterdir()))
    )
    if written or keep:
        atomic_write_text(run_dir / "FAILED", f"{type(err).__name__}: {err}\n")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


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
        trained = None
        if args.print_config:
            if args.checkpoint:
                adopt_checkpoint_structure(cfg, args.checkpoint)
            print_config(cfg)
            return
        prepare_process()
        if args.checkpoint:
            trained = adopt_checkpoint_structure(cfg, args.checkpoint)
        task, model, datasets = build_components(cfg, raw_config(args.cfg_path, args.options))
        from lavis.common import dist

        run_dir = _set_evaluation_run_dir(cfg, args, trained)
        continued = run_dir.exists()  # an evaluation being continued is never removed
        finished = False
        try:
            run_fewshot_evaluation(cfg, task, model, datasets, checkpoint=trained)
            finished = True
            if dist.is_main_process():
                (run_dir / "FAILED").unlink(missing_ok=True)  # a continued evaluation that now succeeded
        except BaseException as err:
            _clean_failed_evaluation(run_dir, err, keep=continued)
            raise
        finally:
            # After an error, peers may be dead or stuck: leave at once instead of waiting at a barrier.
            dist.destroy(wait=finished)

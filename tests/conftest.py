"""Shared fixtures of the end-to-end tests: one tiny shapes set, tiny configs, the entry points as subprocesses.

The shapes set is generated once per session (50 images: 40 train, 5 val, 5 test, so the evaluated
splits have an odd number of captions (5) and questions (25) and a 2-process DistributedSampler pads).
Entry points run as real subprocesses with one thread each, without torchrun's variables leaking in
from the environment, and without PETVLM_DATA (every path comes from the test's config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHAPES_IMAGES = 50

# The demo's tiny OpenFlamingo with LoRA on the LM (as configs/demo/shapes_train.yaml).
TINY_MODEL = {
    "arch": "openflamingo",
    "model_type": "tiny",
    "trainable": {"perceiver": True, "gated_cross_attn": True, "new_token_embeddings": False, "lm_embeddings": True},
    "adapters": {
        "method": "lora",
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "apply_to": ["lang_encoder"],
    },
}
# Short greedy decoding keeps every evaluation at a fraction of a second.
FAST_DECODING = {"num_beams": 1, "max_new_tokens": 8, "length_penalty": 0.0}
# The caption_vqa task also decodes VQA answers, with their own length.
FAST_JOINT_DECODING = {**FAST_DECODING, "vqa_max_new_tokens": 3}
_DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
    "ROLE_RANK",
)


def shapes_section(root: Path) -> dict:
    """A ``datasets.shapes_*`` section reading the session's shapes set."""
    return {"shapes": {"root": str(root), "num_images": SHAPES_IMAGES}}


def write_config(path: Path, *, run: dict, datasets: dict, model: dict | None = None) -> Path:
    """A project YAML with the tiny model (or ``model``), ``datasets`` and ``run``."""
    path.write_text(yaml.safe_dump({"model": model or TINY_MODEL, "datasets": datasets, "run": run}, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict:
    """The environment of an entry-point subprocess: single-threaded, no inherited torchrun or data variables."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    for key in (*_DIST_VARS, "PETVLM_DATA", "LLAMA_PATH", "OPENFLAMINGO_CHECKPOINT", "CLIP_VITL14_WEIGHTS"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_entry(
    script: str,
    cfg_path: Path | str,
    options: list[str] = (),
    nproc: int = 1,
    extra_args: list[str] = (),
    env: dict | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """``python <script> --cfg-path CFG [...] --options ...`` (under torchrun when ``nproc`` > 1), in the repo."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(REPO / script), "--cfg-path", str(cfg_path), *extra_args]
    if options:
        cmd += ["--options", *options]
    return subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    """Fail with the tail of the subprocess's output unless it exited 0."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """The session's shapes set, generated once before any subprocess could race to generate it."""
    from lavis.datasets.builders.shapes import ShapesOptions, ensure_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    return ensure_shapes(ShapesOptions(root=str(root), num_images=SHAPES_IMAGES))


@pytest.fixture(scope="session")
def trained_checkpoint(shapes_root, tmp_path_factory) -> Path:
    """Trainable weights of the tiny model after 2 epochs on shapes captions + VQA.

    An untrained tiny model writes the same words for every input, so equal outputs would
    prove little; this one answers questions differently and scores above zero.
    """
    out = tmp_path_factory.mktemp("pretrain")
    cfg = write_config(
        out / "pretrain.yaml",
        datasets={"shapes_caption": shapes_section(shapes_root), "shapes_vqa": shapes_section(shapes_root)},
        run={
            "task": "caption_vqa",
            "device": "cpu",
            "max_epoch": 2,
            "batch_size_train": 16,
            "init_lr": 2.0e-3,
            "min_lr": 1.0e-4,
            "warmup_steps": 5,
            "weight_decay": 0.0,
            "param_groups": [{"match": "(attn|ff)_gate$", "lr_scale": 10.0}],
            "log_freq": 10,
            "progress_bar": False,
            "save_epoch_end": False,
            "output_dir": str(out),
            "run_name": "run",
        },
    )
    check_ok(run_entry("train.py", cfg))
    checkpoints = sorted((out / "run" / "checkpoints").glob("step_*.pt"))
    assert checkpoints, "the pre-training run saved no checkpoint"
    return checkpoints[-1]


@pytest.fixture(scope="session")
def bad_inputs_world(tmp_path_factory, shapes_root) -> dict:
    """The files test_bad_inputs_config.py's and test_bad_inputs_files.py's cases point at, built once
    (bad_inputs_harness.build_world: a config, a finished run with checkpoints, COCO-style data, results files)."""
    from bad_inputs_harness import build_world

    return build_world(tmp_path_factory.mktemp("bad_inputs"), shapes_root)

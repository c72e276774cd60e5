"""The README's journey after training, run as written: train, list, predict, evaluate, export, Python API.

The commands between the JOURNEY markers and the block between the PYTHON EXAMPLE markers run in a fresh
folder that holds the repository's configs and entry points (so ``output/`` and ``data/`` land there),
with ``python`` being this interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, check_ok, subprocess_env

pytestmark = pytest.mark.slow


def between(text: str, name: str) -> str:
    block = re.search(rf"<!-- BEGIN {name}[^>]*-->\s*```\w+\n(.*?)```\s*<!-- END {name} -->", text, re.S)
    assert block, f"README has no {name} block"
    return block.group(1)


def commands(block: str) -> list[str]:
    """The shell commands of a bash block (comments dropped, continuation lines joined)."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def workdir(tmp_path) -> Path:
    for name in ("configs", "train.py", "evaluate.py"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "python"  # a script, not a link: a link would lose the virtual environment
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return tmp_path


def test_the_journey_after_training_runs_as_the_readme_says(workdir):
    readme = (REPO / "README.md").read_text()
    env = subprocess_env(
        PATH=f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    outputs = []
    for command in commands(between(readme, "JOURNEY")):
        proc = subprocess.run(
            ["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
        )
        check_ok(proc)
        outputs.append(proc.stdout)
    train, listing, captions, answers, table, export = outputs
    run_dir = workdir / "output" / "my_first_project" / "first"
    assert "run finished: 60 step(s)" in train and (run_dir / "checkpoints" / "best.pt").is_file()
    assert "model_type tiny" in listing
    val_images = sorted((workdir / "data" / "shapes_small" / "images" / "shapes_val").glob("*.png"))
    assert [line.split("\t")[0] for line in captions.splitlines()] == [str(p.relative_to(workdir)) for p in val_images]
    assert [json.loads(line)["question"] for line in answers.splitlines()] == ["What colour is the shape?"] * len(
        val_images
    )
    assert "shapes_caption/val (CIDEr)" in table
    assert (workdir / "output" / "my_first_project" / "eval_my_first_project_first_best" / "fewshot_table.md").is_file()
    adapter = json.loads((workdir / "output" / "my_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny" and "exported (peft)" in export

    proc = subprocess.run(
        [sys.executable, "-c", between(readme, "PYTHON EXAMPLE")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check_ok(proc)
    printed = proc.stdout.splitlines()
    assert len(printed) == 4 and all(line.startswith("['") for line in printed[:3]), printed

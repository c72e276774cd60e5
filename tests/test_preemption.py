"""SIGTERM to the launcher (what a scheduler sends): every rank saves at one step boundary and the job exits 0.

The launcher is ``scripts/preemptible_torchrun.py`` (the README's SLURM pattern), running a 2-process
toy training under torchrun on gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lavis.runners import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "ddp_toy_run.py"

pytestmark = pytest.mark.slow


def test_sigterm_to_the_launcher_saves_on_every_rank_and_exits_zero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "preemptible_torchrun.py"),
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            str(tmp_path),
            "slow",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "started").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-3000:]
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["status"] == results[1]["status"] == "preempted"
    step = results[0]["step"]
    assert results[1]["step"] == step and 1 <= step < 8
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(Path(results[0]["run_dir"])))
    assert state["progress"]["global_step"] == step and len(state["rng"]) == 2
    assert "resume with --options run.resume_ckpt_path=latest" in out

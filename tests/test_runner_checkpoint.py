"""Checkpoint files: atomic writes under SIGKILL, refusal of pickled objects, RNG states, latest/pruning."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lavis.common.errors import CheckpointError
from lavis.runners import checkpoint as ckpt
from lavis.runners.checkpoint_integrity import PickledCodeError

SCRIPTS = Path(__file__).parent / "scripts"


class NotATensor:
    """Any class instance: loading it would need to import and run code named by the file."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_round_trip_of_plain_state(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "best": {"metric": None}, "name": "x"}
    ckpt.save_checkpoint(tmp_path / "a.pt", state)
    loaded = ckpt.load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7 and loaded["best"] == {"metric": None} and loaded["name"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": NotATensor()}, path)
    with pytest.raises(
        PickledCodeError,
        match=r"evil.pt: refused: this file carries pickled code \(GLOBAL .*NotATensor\); it was not executed",
    ):
        ckpt.load_checkpoint(path)


def test_unreadable_and_missing_files_are_checkpoint_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint file not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


def test_sigkill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(ckpt.step_checkpoint_path(run_dir, 1), {"step": 1})
    target = run_dir / ckpt.CHECKPOINT_DIR / ckpt.BEST_NAME
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "stalled_checkpoint_write.py"), str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STALLED"
        # The half-written temporary file exists right now, beside the intact target.
        assert any(p.name.startswith(".best.pt.") for p in target.parent.iterdir())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = ckpt.load_checkpoint(target)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(1000))
    # "latest" ignores the leftover temporary file.
    assert ckpt.latest_checkpoint(run_dir).name == "step_00000001.pt"


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": [ckpt.capture_rng_state()]})
    expected = (random.random(), np.random.normal(), torch.rand(3))
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"][0])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_latest_and_keep_last(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt.latest_checkpoint(tmp_path)
    for step in (3, 12, 7, 100):
        ckpt.save_checkpoint(ckpt.step_checkpoint_path(tmp_path, step), {"step": step})
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000100.pt"
    deleted = ckpt.prune_step_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_00000003.pt", "step_00000007.pt"]
    assert [s for s, _ in ckpt.list_step_checkpoints(tmp_path)] == [12, 100]


def test_atomic_write_replaces_content_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "f.txt"
    ckpt.atomic_write_bytes(path, b"old")
    ckpt.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert len(synced) == 4  # the file and its directory, for each write

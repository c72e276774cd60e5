"""Checkpoints prove their integrity, refuse pickled code by its kind, and `latest` falls back to one that verifies.

Damage is made three ways: bytes flipped inside a tensor record in place (the zip CRC no longer
matches), the same flip with the CRCs rewritten (only the content hash can tell), and truncated or
random files. Each must be a CheckpointError naming the file, never an IndexError or KeyError.
"""

from __future__ import annotations

import builtins
import os
import posix
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from toy_components import ToyModel, build_runner, make_cfg

from lavis.common.errors import CheckpointError
from lavis.runners import checkpoint as ckpt
from lavis.runners.checkpoint_integrity import PickledCodeError


class CustomPayload:
    """Any class: unpickling it would import and run code named by the file."""

    def __reduce__(self):
        return (CustomPayload, ())


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "format_version": 2,
        "model": {"w": torch.randn(64, 16, generator=g), "b": torch.zeros(16)},
        "progress": {"global_step": 3},
        "config": {"run": {"seed": 1}},
    }


def _tensor_record(path: Path) -> tuple[zipfile.ZipInfo, int]:
    """The zip entry of the largest tensor and the file offset where its bytes start."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info, info.header_offset + 30 + name_len + extra_len


def flip_in_place(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes inside the largest tensor record (the record's CRC then mismatches)."""
    info, start = _tensor_record(path)
    raw = bytearray(path.read_bytes())
    for i in range(n):
        raw[start + 8 + i] ^= 0x5A
    path.write_bytes(bytes(raw))


def flip_with_valid_crc(path: Path, out: Path) -> None:
    """The same damage, written as a new zip whose CRCs describe the damaged bytes."""
    info, _ = _tensor_record(path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for entry in src.infolist():
            data = src.read(entry.filename)
            if entry.filename == info.filename:
                data = bytes(b ^ 0x5A if 8 <= i < 72 else b for i, b in enumerate(data))
            dst.writestr(entry, data)


def test_intact_checkpoint_round_trips_and_its_hash_is_not_returned(tmp_path):
    ckpt.save_checkpoint(tmp_path / "a.pt", _state())
    loaded = ckpt.load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(loaded["model"]["w"], _state()["model"]["w"]) and "integrity" not in loaded


def test_flipped_bytes_are_a_crc_error_and_with_rewritten_crcs_a_hash_mismatch(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "a.pt", _state())
    flip_with_valid_crc(path, tmp_path / "b.pt")
    # torch itself accepts the damaged tensor silently:
    assert not torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["model"]["w"], _state()["model"]["w"])
    with pytest.raises(CheckpointError, match=r"b.pt: corrupt checkpoint: its content does not match the sha256"):
        ckpt.load_checkpoint(tmp_path / "b.pt")
    flip_in_place(path)
    with pytest.raises(CheckpointError, match=r"a.pt: corrupt checkpoint: the CRC of its record .*data/\d+"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("seed", range(40))
def test_truncated_and_random_files_are_always_a_checkpoint_error(tmp_path, seed):
    rng = random.Random(seed)
    intact = ckpt.save_checkpoint(tmp_path / "intact.pt", _state()).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(intact[: rng.randrange(1, len(intact))])
    noise = tmp_path / "noise.pt"
    # Random bytes, sometimes behind a zip signature so that the zip reader gets further.
    noise.write_bytes((b"PK\x03\x04" if seed % 2 else b"") + rng.randbytes(rng.randrange(1, 5000)))
    spliced = tmp_path / "spliced.pt"
    cut = rng.randrange(1, len(intact))
    spliced.write_bytes(intact[:cut] + rng.randbytes(rng.randrange(1, 200)) + intact[cut + 100 :])
    for path in (truncated, noise, spliced):
        with pytest.raises(CheckpointError, match=rf"{path.name}: "):
            ckpt.load_checkpoint(path)


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (os.system, f"{os.system.__module__}.system"),
        (posix.system, "posix.system"),
        (builtins.eval, "builtins.eval"),
        (CustomPayload(), "test_checkpoint_integrity.CustomPayload"),
    ],
    ids=["os.system", "posix.system", "builtins.eval", "custom class"],
)
def test_pickled_code_is_refused_by_its_kind_and_not_run(tmp_path, payload, named):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": payload}, path)
    with pytest.raises(PickledCodeError) as caught:
        ckpt.load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: this file carries pickled code (GLOBAL ")
    assert f"(GLOBAL {named})" in message and "it was not executed" in message and "corrupt" not in message


def _toy_run(root: Path, **run):
    runner = build_runner(make_cfg(root, max_epoch=1, save_freq_steps=2, keep_last=3, **run), model=ToyModel())
    summary = runner.train()
    runner.close()
    return runner, summary


def test_latest_falls_back_to_the_newest_checkpoint_that_verifies_and_says_so(tmp_path):
    runner, _ = _toy_run(tmp_path, max_steps=6)
    found = ckpt.list_step_checkpoints(runner.paths.run_dir)
    assert [step for step, _ in found] == [2, 4, 6]
    flip_in_place(found[-1][1])
    assert ckpt.latest_checkpoint(runner.paths.run_dir) == found[-2][1]
    resumed, summary = _toy_run(tmp_path, resume_ckpt_path="latest")
    log = (runner.paths.run_dir / "log.txt").read_text()
    assert summary["status"] == "finished" and f"resumed from {found[-2][1]} at step 4" in log
    assert "step_00000006.pt: corrupt checkpoint" in log and f"falling back to {found[-2][1]}" in log
    # When none verifies, starting over would silently lose the run: a clear error instead.
    for _, path in ckpt.list_step_checkpoints(runner.paths.run_dir):
        flip_in_place(path)
    with pytest.raises(CheckpointError, match=r"no checkpoint of the run verifies"):
        ckpt.latest_checkpoint(runner.paths.run_dir)


def test_stale_temporary_files_are_removed_at_start_and_by_pruning(tmp_path):
    runner, _ = _toy_run(tmp_path, max_steps=2)
    checkpoints = runner.paths.checkpoints
    stale = [checkpoints / ".step_00000004.pt.abc123.tmp", checkpoints / ".best.pt.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (checkpoints / ".step_00000008.tmp-zz").mkdir()  # an interrupted sharded write
    keep = checkpoints / "notes.txt"
    keep.write_text("mine")
    resumed, _ = _toy_run(tmp_path, resume_ckpt_path="latest", max_steps=3)
    assert not any(p.exists() for p in stale) and not (checkpoints / ".step_00000008.tmp-zz").exists()
    assert keep.read_text() == "mine"
    # Pruning after a save removes what a write interrupted since.
    stale[0].write_bytes(b"again")
    ckpt.prune_step_checkpoints(runner.paths.run_dir, keep_last=1)
    assert not stale[0].exists() and len(ckpt.list_step_checkpoints(runner.paths.run_dir)) == 1

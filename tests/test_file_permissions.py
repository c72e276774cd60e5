"""Files the project writes get the permissions of the user's umask, while writes stay atomic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lavis.common.fileio import atomic_directory, atomic_write_bytes, atomic_write_json, current_umask


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    yield set_mask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tree_modes(root: Path) -> dict[str, int]:
    """``{relative path: mode}`` of every file and folder under ``root`` (``root`` included)."""
    found = {".": mode(root)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = mode(path)
    return found


def check_shareable(root: Path) -> None:
    """Every folder under ``root`` is 0755 and every file 0644 (umask 022)."""
    wrong = {name: oct(m) for name, m in tree_modes(root).items() if m != (0o755 if (root / name).is_dir() else 0o644)}
    assert not wrong, wrong


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "deep" / "b.json", {"k": 1})
    with atomic_directory(tmp_path / "export") as tmp:
        Path(tmp, "weights.bin").write_bytes(b"w")
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "deep" / "b.json") == 0o666 & ~mask
    assert mode(tmp_path / "export") == mode(tmp_path / "deep") == 0o777 & ~mask
    assert mode(tmp_path / "export" / "weights.bin") == 0o666 & ~mask


def test_a_training_run_directory_is_readable_by_the_group_and_others(tmp_path, umask, shapes_root):
    from conftest import check_ok, run_entry, shapes_section, write_config

    cfg = write_config(
        tmp_path / "c.yaml",
        datasets={"shapes_caption": {**shapes_section(shapes_root), "max_samples": 32}},
        run={
            "task": "captioning",
            "device": "cpu",
            "batch_size_train": 16,
            "valid_splits": ["val"],
            "val_freq": 1,
            "metrics": ["CIDEr"],
            "num_beams": 1,
            "max_new_tokens": 4,
            "progress_bar": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
        },
    )
    umask(0o022)  # the subprocess inherits it
    check_ok(run_entry("train.py", cfg))
    run_dir = tmp_path / "out" / "run"
    assert (run_dir / "checkpoints" / "best.pt").is_file() and any((run_dir / "results").iterdir())
    check_shareable(tmp_path / "out")

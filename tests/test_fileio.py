"""Atomic writes (files and folders) and JSON reading with user errors (lavis/common/fileio.py)."""

from __future__ import annotations

import json
import os

import pytest

from lavis.common.errors import DataError
from lavis.common.fileio import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    read_json,
)


def test_atomic_writes_create_parents_and_replace_content(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    atomic_write_json(path, {"caption": "un chat é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"caption": "un chat é"}
    assert "é" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    atomic_write_text(path, "[1, 2]")
    assert read_json(path) == [1, 2]
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="serialiser crashed"):
        with atomic_writer(path) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("serialiser crashed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_atomic_directory_replaces_a_folder_as_a_whole(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        open(os.path.join(tmp, "v1.txt"), "w").write("1")
    with atomic_directory(target) as tmp:
        assert not os.listdir(tmp)  # a fresh folder, not a copy of the old one
        open(os.path.join(tmp, "v2.txt"), "w").write("2")
    assert os.listdir(target) == ["v2.txt"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # neither the temporary nor the old folder is left


def test_atomic_directory_without_replace_refuses_an_existing_folder(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "theirs.txt").write_text("another process got here first")
    with pytest.raises(OSError):
        with atomic_directory(target, replace=False) as tmp:
            open(os.path.join(tmp, "mine.txt"), "w").write("x")
    assert os.listdir(target) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_read_json_errors_name_the_file_and_the_position(tmp_path):
    with pytest.raises(DataError, match=r"Karpathy split file not found: .*nope\.json"):
        read_json(tmp_path / "nope.json", "Karpathy split file")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  1,,\n]}')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON \(JSON file\): .* at line 2 column 5"):
        read_json(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'"caf\xe9"')
    with pytest.raises(DataError, match=r"latin\.json: cannot read questions"):
        read_json(latin, "questions")


def test_gc_paused_pauses_the_collector_and_restores_its_state(tmp_path):
    import gc

    from lavis.common.fileio import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2]}')
    assert read_json(path) == {"a": [1, 2]} and gc.isenabled()

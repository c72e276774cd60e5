"""Every benchmark script imports against the current package (a renamed or removed name fails here, not in
the next `make bench`). Running them is `make bench`'s job: they measure, they are not tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # the scripts import each other (train_step -> fewshot_eval)
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    if '__name__ == "__main__"' in path.read_text():  # a script; release_formulas.py is a module they share
        assert callable(getattr(module, "main", None)), f"{path.name} has no main()"

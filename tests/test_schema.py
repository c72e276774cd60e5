"""The dataclass schema checker: defaults, types, unknown keys, all errors at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lavis.common.schema import check_mapping, describe, merged_schema


@dataclass
class Inner:
    heads: int = 8
    dim_head: int = 64


@dataclass
class Outer:
    name: str
    lr: float = 1e-4
    amp: Literal["fp32", "fp16", "bf16"] = "fp32"
    splits: list[str] = field(default_factory=lambda: ["val"])
    path: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_filled_and_int_accepted_as_float():
    out, errors = check_mapping({"name": "x", "lr": 1}, Outer, "run")
    assert errors == []
    assert out == {
        "name": "x",
        "lr": 1.0,
        "amp": "fp32",
        "splits": ["val"],
        "path": None,
        "inner": {"heads": 8, "dim_head": 64},
    }
    assert isinstance(out["lr"], float)


def test_every_problem_is_reported_with_its_path():
    _, errors = check_mapping(
        {"lr": "fast", "amp": "fp61", "splits": "val", "inner": {"head": 4}, "pth": "a"}, Outer, "run"
    )
    text = "\n".join(errors)
    assert "run.lr: expected float, got str 'fast'" in text
    assert "run.amp: 'fp61' is not one of 'fp32', 'fp16', 'bf16' (did you mean 'fp16'?)" in text
    assert "run.splits: expected list[str]" in text
    assert "run.inner.head: unknown key. Did you mean 'heads'?" in text
    assert "run.pth: unknown key. Did you mean 'path'?" in text
    assert "run.name: required key is missing" in text
    assert len(errors) == 6


def test_bool_is_not_an_int_and_null_only_where_optional():
    _, errors = check_mapping({"name": "x", "inner": {"heads": True}, "lr": None}, Outer, "m")
    assert any(e.startswith("m.inner.heads: expected int") for e in errors)
    assert any(e.startswith("m.lr: must not be null") for e in errors)
    out, errors = check_mapping({"name": "x", "path": None}, Outer, "m")
    assert errors == [] and out["path"] is None


def test_merged_schema_takes_fields_of_both():
    @dataclass
    class Extra:
        num_beams: int = 3

    both = merged_schema("Both", Inner, Extra)
    out, errors = check_mapping({"heads": 2, "num_beams": 5}, both, "run")
    assert errors == [] and out == {"heads": 2, "dim_head": 64, "num_beams": 5}


def test_describe_types():
    assert describe(Optional[list[int]]) == "list[int] | null"
    assert describe(Literal["a", "b"]) == "a | b"

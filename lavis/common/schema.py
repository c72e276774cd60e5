"""Typed schemas for config sections, written as dataclasses.

Each registered component declares its options as a nested ``Config`` dataclass.
``check(value, schema, path)`` walks a plain YAML value against such a type and
returns the value with defaults filled in, plus every problem it found (it does
not stop at the first), each naming the dotted key path and, for unknown keys,
the nearest valid names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from lavis.common.registry import nearest

_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def field_types(schema: type) -> dict[str, Any]:
    """The resolved type of every field of a dataclass (string annotations included)."""
    return typing.get_type_hints(schema)


def default_of(field: dataclasses.Field):
    """A field's default value, or dataclasses.MISSING when it has none (a required key)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def describe(tp) -> str:
    """A human name for a type, as used in error messages and the config reference."""
    if tp in _SCALARS:
        return tp.__name__
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [describe(a) for a in args if a is not type(None)]
        suffix = " | null" if type(None) in args else ""
        return " | ".join(inner) + suffix
    if origin is list:
        return f"list[{describe(args[0])}]" if args else "list"
    if origin is dict:
        return f"mapping of {describe(args[1])}" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _type_error(path: str, tp, value) -> list[str]:
    return [f"{path}: expected {describe(tp)}, got {type(value).__name__} {value!r}"]


def check(value, tp, path: str) -> tuple[Any, list[str]]:
    """Check ``value`` against type ``tp``; return (value with defaults filled, errors)."""
    if tp is Any:
        return value, []
    if dataclasses.is_dataclass(tp):
        return check_mapping(value, tp, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return (None, []) if type(None) in args else ([None], [f"{path}: must not be null ({describe(tp)})"])
        first_errors = None
        for arm in (a for a in args if a is not type(None)):
            checked, errors = check(value, arm, path)
            if not errors:
                return checked, []
            first_errors = first_errors or errors
        # For Optional[X] the arm's own message is the useful one.
        return value, first_errors if len(args) == 2 else _type_error(path, tp, value)
    if origin is Literal:
        if value in args:
            return value, []
        hint = nearest(value, args)
        hint = f" (did you mean {hint!r}?)" if hint else ""
        return value, [f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint}"]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return value, _type_error(path, tp, value)
        item_tp = args[0] if args else Any
        out, errors = [], []
        for i, item in enumerate(value):
            checked, errs = check(item, item_tp, f"{path}[{i}]")
            out.append(checked)
            errors += errs
        return out, errors
    if origin is dict:
        if not isinstance(value, dict):
            return value, _type_error(path, tp, value)
        value_tp = args[1] if args else Any
        out, errors = {}, []
        for key, item in value.items():
            checked, errs = check(item, value_tp, f"{path}.{key}")
            out[key] = checked
            errors += errs
        return out, errors
    if value is None:
        return value, [f"{path}: must not be null (expected {describe(tp)})"]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), []
    if tp is int and isinstance(value, bool):
        return value, _type_error(path, tp, value)
    if isinstance(value, tp):
        return value, []
    return value, _type_error(path, tp, value)


def check_mapping(value, schema: type, path: str, extra_allowed: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """Check a mapping against a dataclass: unknown keys, missing required keys, each field's type."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return value, _type_error(path, schema, value)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = field_types(schema)
    errors: list[str] = []
    out: dict = {}
    for key, item in value.items():
        if key in extra_allowed:
            out[key] = item
            continue
        if key not in fields:
            hint = nearest(key, fields)
            hint = f" Did you mean {hint!r}?" if hint else ""
            known = ", ".join(sorted(fields))
            errors.append(f"{path}.{key}: unknown key.{hint} Valid keys: {known}")
            continue
        out[key], errs = check(item, hints[key], f"{path}.{key}")
        errors += errs
    for name, field in fields.items():
        if name in out:
            continue
        default = default_of(field)
        if default is dataclasses.MISSING:
            errors.append(f"{path}.{name}: required key is missing ({describe(hints[name])})")
            continue
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        out[name], errs = check(default, hints[name], f"{path}.{name}")
        errors += errs
    # A schema may check relations between its values (a width its heads must divide, ...); it reports them
    # with dotted keys under `path`. Only once every value has the right type.
    if not errors and callable(getattr(schema, "value_errors", None)):
        errors += schema.value_errors(out, path)
    return out, errors


def merged_schema(name: str, *schemas: type) -> type:
    """One dataclass holding the fields of several (e.g. the runner's and the task's keys of ``run``)."""
    seen: dict[str, tuple] = {}
    for schema in schemas:
        hints = field_types(schema)
        for f in dataclasses.fields(schema):
            spec = dataclasses.field(default=f.default, default_factory=f.default_factory)
            seen.setdefault(f.name, (f.name, hints[f.name], spec))
    return dataclasses.make_dataclass(name, list(seen.values()))

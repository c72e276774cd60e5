"""Typed schemas for config sections, written as dataclasses.

Each registered component declares its options as a nested ``Config`` dataclass.
``check(value, schema, path)`` walks a plain YAML value against such a type and
returns the value with defaults filled in, plus every problem it found (it does
not stop at the first), each naming the dotted key path and, for unknown keys,
the nearest valid names. A Config that subclasses :class:`Validated` adds its range
and cross-field checks (``validate``), run on the typed instance once every value
has its type and reported with the schema errors. ``config_instance`` turns a section
into its Config instance (what a component receives), or raises one ConfigError.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union

from lavis.common.errors import ConfigError
from lavis.common.registry import nearest

_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class ValueProblem(str):
    """A problem found by ``Validated.validate`` (the values have their types), as opposed to a schema error."""


def well_typed(errors: list[str]) -> bool:
    """True when ``errors`` hold only value problems: the section can be instantiated and checked further."""
    return all(isinstance(e, ValueProblem) for e in errors)


class Validated:
    """Base of a Config dataclass whose values have relations the types cannot express."""

    def validate(self, path: str) -> list[str]:
        """Range and cross-field problems, each ``<dotted key under path>: <what is wrong>``; [] when fine."""
        return []


def instantiate(schema: type, values: dict):
    """The ``schema`` instance of a mapping ``check_mapping`` accepted (nested dataclasses built too)."""
    hints = field_types(schema)
    return schema(
        **{f.name: _build(hints[f.name], values[f.name]) for f in dataclasses.fields(schema) if f.name in values}
    )


def _build(tp, value):
    if dataclasses.is_dataclass(tp):
        return instantiate(tp, value) if isinstance(value, dict) else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType) and value is not None:
        arms = [a for a in args if dataclasses.is_dataclass(a)]
        return instantiate(arms[0], value) if arms and isinstance(value, dict) else value
    if origin is list and args:
        return [_build(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _build(args[1], v) for k, v in value.items()}
    return value


def config_instance(schema: type, section, path: str):
    """``section`` (a mapping, a DictConfig, or already a ``schema`` instance) as a checked ``schema`` instance.

    The one place a section is validated: the config loader and code that builds a component from a plain
    dict both come here. Every problem is reported in one ConfigError with dotted keys under ``path``.
    """
    if isinstance(section, schema):
        return section
    from omegaconf import OmegaConf

    if OmegaConf.is_config(section) and OmegaConf.get_type(section) is schema:
        # A structured node of this schema: the loader made it from a checked instance (and an assignment
        # to it since is type-checked), so it is not validated again.
        return OmegaConf.to_object(section)
    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    values, errors = check_mapping(section, schema, path)
    if errors:
        listing = "\n  - ".join(dict.fromkeys(errors))
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  - {listing}")
    return instantiate(schema, values)


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
    # A Validated schema checks relations between its values (a width its heads must divide, ...) on its typed
    # instance, with dotted keys under `path`; only once every value has the right type.
    if well_typed(errors) and issubclass(schema, Validated):
        errors += [ValueProblem(e) for e in instantiate(schema, out).validate(path)]
    return out, errors


@functools.cache
def merged_schema(name: str, *schemas: type) -> type:
    """One dataclass holding the fields of several (e.g. the runner's and the task's keys of ``run``).

    ``schemas`` go from the most basic (the runner's) to the most specific (the task's): the class
    inherits from all of them, so each one's ``validate`` runs (they chain through ``super()``) and a
    method of a later schema (e.g. the task's ``metric_names``) is found before an earlier one's. A key
    in two of them would mean two things in one flat section: a TypeError. Cached, so that the loader
    and a component given a section in code get the same class.
    """
    owners: dict[str, type] = {}
    for schema in schemas:
        for f in dataclasses.fields(schema):
            if owners.setdefault(f.name, schema) is not schema and not issubclass(schema, owners[f.name]):
                raise TypeError(f"{name}: key {f.name!r} is declared by both {owners[f.name]} and {schema}")
    return dataclasses.make_dataclass(name, [], bases=tuple(reversed(schemas)))

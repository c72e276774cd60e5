"""Name -> class registry for everything a YAML file can name.

Kinds: task, model, builder, processor, lr_scheduler, runner. Registration
rejects duplicates; a lookup of an unknown name lists the known ones and the
nearest match, so a typo in a YAML file is a one-line fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from lavis.common.errors import ConfigError

KINDS = ("task", "model", "builder", "processor", "lr_scheduler", "runner")


def nearest(name: str, candidates) -> str | None:
    """The closest candidate to ``name`` (or None when nothing is close)."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return match[0] if match else None


class Registry:
    """Maps (kind, name) to a registered class or function."""

    def __init__(self):
        self._entries: dict[str, dict[str, object]] = {kind: {} for kind in KINDS}

    def _table(self, kind: str) -> dict[str, object]:
        if kind not in self._entries:
            raise ValueError(f"unknown registry kind {kind!r}; kinds are {', '.join(KINDS)}")
        return self._entries[kind]

    def register(self, kind: str, name: str) -> Callable:
        """Decorator: ``@registry.register("model", "openflamingo")``."""
        table = self._table(kind)

        def wrap(obj):
            if name in table and table[name] is not obj:
                raise ValueError(f"{kind} {name!r} is already registered (by {table[name]!r})")
            table[name] = obj
            return obj

        return wrap

    def get(self, kind: str, name: str, key_path: str | None = None):
        """The object registered as ``name``; a ConfigError naming the known names otherwise."""
        _import_builtin_components()
        table = self._table(kind)
        if name in table:
            return table[name]
        where = f"{key_path}: " if key_path else ""
        known = ", ".join(sorted(table)) or "(none)"
        hint = nearest(name, table)
        hint = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigError(f"{where}unknown {kind} {name!r}.{hint} Known {kind}s: {known}")

    def names(self, kind: str) -> list[str]:
        _import_builtin_components()
        return sorted(self._table(kind))

    # Short forms in the LAVIS style.
    def register_task(self, name):
        return self.register("task", name)

    def register_model(self, name):
        return self.register("model", name)

    def register_builder(self, name):
        return self.register("builder", name)

    def register_processor(self, name):
        return self.register("processor", name)

    def register_lr_scheduler(self, name):
        return self.register("lr_scheduler", name)

    def register_runner(self, name):
        return self.register("runner", name)


registry = Registry()

_BUILTINS_IMPORTED = False


def _import_builtin_components() -> None:
    """Import the package's own components once so that they are registered before any lookup."""
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    _BUILTINS_IMPORTED = True
    import importlib

    for module in ("lavis.models", "lavis.datasets", "lavis.tasks", "lavis.runners"):
        importlib.import_module(module)

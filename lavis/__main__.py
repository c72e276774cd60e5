"""``python -m lavis list [models|datasets|tasks|processors|lr_schedulers|runners]``: what is registered.

Each entry is printed with a one-line description (its docstring's first line); models also list their
model types (``lavis/configs/models/<arch>/<model_type>.yaml``) with the first comment line of each.
"""

from __future__ import annotations

import argparse
import inspect

SECTIONS = {
    "models": "model",
    "datasets": "builder",
    "tasks": "task",
    "processors": "processor",
    "lr_schedulers": "lr_scheduler",
    "runners": "runner",
}


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].replace("``", "") if doc.strip() else ""


def _model_types(arch: str) -> list[tuple[str, str]]:
    from lavis.common.config import CONFIG_ROOT

    types = []
    for path in sorted((CONFIG_ROOT / "models" / arch).glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.strip()), "")
        types.append((path.stem, first.lstrip("# ").strip() if first.startswith("#") else ""))
    return types


def listing(sections: list[str]) -> str:
    """The text ``python -m lavis list`` prints for ``sections``."""
    from lavis.common.registry import registry

    registry.names("model")  # imports the built-in components
    lines = []
    for section in sections:
        kind = SECTIONS[section]
        lines.append(f"{section}:")
        for name in registry.names(kind):
            lines.append(f"  {name:<24} {_summary(registry.get(kind, name))}".rstrip())
            if kind == "model":
                for model_type, description in _model_types(name):
                    lines.append(f"    model_type {model_type:<18} {description}".rstrip())
    return "\n".join(lines)


def main(argv=None) -> None:
    """The CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m lavis", description="PET-VLM command line")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("list", help="list the registered components")
    show.add_argument("what", nargs="*", choices=list(SECTIONS), default=[], help="which registries (default: all)")
    args = parser.parse_args(argv)
    print(listing(list(args.what) or list(SECTIONS)))


if __name__ == "__main__":
    main()

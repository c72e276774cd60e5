"""environment.yaml (conda, GPU machines) stays in step with pyproject.toml (pip)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yaml_lists_exactly_the_pip_dependencies_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted.update({_name(r): r for r in extra})
    env = yaml.safe_load((REPO / "environment.yaml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    listed = {_name(r): r for r in pip_section}
    # torch and torchvision come from conda's pytorch channel (with CUDA), everything else from pip.
    conda_names = {_name(d.replace("pytorch", "torch")) for d in conda}
    assert {"torch", "torchvision"} <= conda_names
    assert set(listed) | {"torch", "torchvision"} == set(wanted)
    for name, requirement in listed.items():
        assert requirement.replace(" ", "") == wanted[name].replace(" ", ""), (name, requirement, wanted[name])
    assert any(d.startswith("python=3.11") for d in conda)

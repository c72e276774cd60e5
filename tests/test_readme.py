"""The README stays true: its config reference is the generated one, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from lavis.common import config_reference

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_config_reference_is_current():
    start, end = README.index(config_reference.BEGIN), README.index(config_reference.END)
    current = README[start : end + len(config_reference.END)] + "\n"
    assert current == config_reference.generate(), (
        "README's config reference is stale: regenerate it with `python -m lavis.common.config_reference` "
        "(or `make reference`)"
    )


def test_every_config_key_is_documented():
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| [^|]+ \| (.*) \|$", config_reference.generate(), re.M)
    assert len(rows) > 100
    undocumented = [key for key, doc in rows if not doc.strip()]
    assert undocumented == []


def test_the_readme_commands_exist():
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in README and re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
    for path in re.findall(r"`((?:configs|benchmarks|coco-caption)/[\w./-]+\.(?:yaml|py|sh|md))`", README):
        assert (REPO / path).is_file(), path

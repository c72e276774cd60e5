"""`make bench`'s report says whether each target was met, from the figures the benchmark printed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from run_all import at_least, at_most, verdict  # noqa: E402


def test_verdict_names_each_target_missed_with_its_value():
    targets = (at_least("speedup_0shot", 2), at_least("speedup_8shot", 3), at_most("memory_ratio", 0.5))
    assert verdict(targets, ["speedup_0shot=2.09", "speedup_8shot=3.0", "memory_ratio=0.41"]) == "met"
    assert verdict(targets, ["speedup_0shot=1.98", "speedup_8shot=3.78", "memory_ratio=0.51"]) == (
        "**missed**: speedup_0shot=1.98, memory_ratio=0.51"
    )
    # A benchmark that crashed before printing a figure has not met its target.
    assert verdict(targets, ["speedup_8shot=4"]) == "**missed**: speedup_0shot not printed, memory_ratio not printed"
    assert verdict((), ["anything=1"]) == ""

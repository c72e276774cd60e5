"""Published few-shot numbers that a config can name (``run.reference_results``) to see its own beside them."""

from __future__ import annotations

from lavis.common.errors import ConfigError

# {name: {"label", "source", "rows": {dataset builder: {"metric", "shots": {num_shots: value}}}}}
REFERENCE_RESULTS = {
    "openflamingo-9b": {
        "label": "OpenFlamingo-9B (published)",
        "source": "OpenFlamingo README / Awadalla et al. 2023, pre-release evaluation protocol",
        "rows": {
            "coco_caption": {"metric": "CIDEr", "shots": {0: 65.5, 4: 74.3, 8: 79.3, 16: 81.8, 32: 84.5}},
            "vqav2": {"metric": "VQA accuracy", "shots": {0: 43.5, 4: 44.0, 8: 47.5, 16: 48.9, 32: 50.3}},
        },
    },
}


def reference_results(name: str | None) -> dict | None:
    """The named reference (None for None); ConfigError listing the known names for an unknown one."""
    if name is None:
        return None
    if name not in REFERENCE_RESULTS:
        raise ConfigError(f"run.reference_results: unknown {name!r}; known: {', '.join(REFERENCE_RESULTS)}")
    return REFERENCE_RESULTS[name]

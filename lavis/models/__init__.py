"""Models. Importing this package registers them (``openflamingo``)."""

from __future__ import annotations

from lavis.models.factory import build_model
from lavis.models.flamingo import Flamingo, OpenFlamingo
from lavis.models.inference import load_model_and_preprocess

__all__ = ["Flamingo", "OpenFlamingo", "build_model", "load_model_and_preprocess"]

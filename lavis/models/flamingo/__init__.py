"""OpenFlamingo: Perceiver resampler + gated cross-attention around a frozen LLaMA and CLIP ViT."""

from lavis.models.flamingo.flamingo import Flamingo
from lavis.models.flamingo.openflamingo import OpenFlamingo

__all__ = ["Flamingo", "OpenFlamingo"]

"""OpenFlamingo: Perceiver resampler + gated cross-attention around a frozen LLaMA and CLIP ViT."""

from lavis.models.flamingo.builder import OpenFlamingo
from lavis.models.flamingo.flamingo import Flamingo

__all__ = ["Flamingo", "OpenFlamingo"]

"""Mixed precision: which ``run.amp`` modes a device supports, the autocast context and the grad scaler.

Decisions:
- fp32: no autocast.
- bf16: autocast to bfloat16, no scaler (its exponent range is fp32's). Refused on a
  GPU without bf16 support (V100 and older) instead of silently running emulated bf16.
  Allowed on the CPU, where torch implements bf16 autocast.
- fp16: autocast to float16 with a GradScaler, CUDA only. On the CPU it is refused:
  fp16 CPU kernels are slow or missing for many ops and it is not a path anyone
  trains on; use fp32 or bf16 there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lavis.common import dist
from lavis.common.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run on one device."""

    amp: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)

    def autocast(self):
        """Context manager for forward passes (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (a disabled one passes calls through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """Check that ``run.amp`` is usable on ``device``; a ConfigError saying what to use otherwise."""
    if amp not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"run.amp: expected fp32, fp16 or bf16, got {amp!r}")
    if amp == "bf16" and not dist.bf16_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise ConfigError(
            f"run.amp: bf16 is not supported on {name} (bf16 needs compute capability 8.0+, e.g. A100/H100); "
            f"use run.amp=fp16 on this GPU"
        )
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"run.amp: fp16 mixed precision is only supported on CUDA devices, not on {device}; "
            f"use run.amp=fp32 or run.amp=bf16 on the CPU"
        )
    return Precision(amp=amp, device=device)

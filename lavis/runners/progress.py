"""Training progress: step time, samples/s, tokens/s, peak memory and ETA, for metrics.jsonl and the bar.

The runner counts each optimizer step's samples and (attended) tokens from the host-side batch (no device
sync) and asks for the figures at each log step, where the loss is read anyway. Throughput is global:
the counts are summed over ranks. Peak memory is CUDA's max allocated on a GPU, the peak RSS of the
process on the CPU.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from lavis.common import dist


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated (this device) or the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def format_eta(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts since the last report; ``report(step, total)`` gives the figures and resets the window."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start = self._window_start = time.perf_counter()
        self._steps = self._samples = self._tokens = 0

    def count(self, micro_batches: list[dict]) -> None:
        """Count one optimizer step of ``micro_batches`` (host tensors, before they move to the device)."""
        self._steps += 1
        for batch in micro_batches:
            mask = batch.get("attention_mask")
            rows = batch.get("lang_x", next((v for v in batch.values() if isinstance(v, torch.Tensor)), None))
            if rows is not None:
                self._samples += int(rows.shape[0])
            if mask is not None:
                self._tokens += int(mask.sum()) if mask.device.type == "cpu" else int(mask.numel())

    def report(self, step: int, total: int) -> dict:
        """``{"time/step_s", "throughput/samples_per_s", "throughput/tokens_per_s", "memory/peak_mb",
        "eta_s"}`` over the window since the last report (every rank must call it: the counts are summed)."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        samples = dist.sum_over_ranks(self._samples)
        tokens = dist.sum_over_ranks(self._tokens)
        step_s = elapsed / max(self._steps, 1)
        out = {
            "time/step_s": step_s,
            "throughput/samples_per_s": samples / elapsed,
            "throughput/tokens_per_s": tokens / elapsed,
            "memory/peak_mb": peak_memory_mb(self.device),
            "eta_s": step_s * max(total - step, 0),
        }
        self._window_start, self._steps, self._samples, self._tokens = now, 0, 0, 0
        return out


TIMING_KEYS = ("time/step_s", "throughput/samples_per_s", "throughput/tokens_per_s", "memory/peak_mb", "eta_s")


def without_timing(record: dict) -> dict:
    """``record`` without the measured figures (to compare two runs' metrics.jsonl for equality)."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def bar_postfix(figures: dict) -> dict:
    """Short fields for the tqdm bar."""
    return {
        "s/step": f"{figures['time/step_s']:.2f}",
        "samples/s": f"{figures['throughput/samples_per_s']:.1f}",
        "ETA": format_eta(figures["eta_s"]),
    }


def train_line(record: dict, figures: dict) -> str:
    """The log.txt line of a training log step."""
    parts = [f"epoch {record['epoch']} step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3g}")
    parts.append(
        f"{figures['time/step_s']:.3f} s/step, {figures['throughput/samples_per_s']:.1f} samples/s, "
        f"{figures['throughput/tokens_per_s']:.0f} tokens/s, peak {figures['memory/peak_mb']:.0f} MiB, "
        f"ETA {format_eta(figures['eta_s'])}"
    )
    return ", ".join(parts)

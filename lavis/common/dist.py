"""Process-group helpers that are no-ops in a single process.

A single process needs no torchrun and no environment variables: nothing here
initialises a process group or waits on a barrier unless ``WORLD_SIZE`` > 1.
Evaluation records are gathered in memory (no per-rank files), de-duplicated by
sample id and checked for coverage here, so every runner and script shares one
implementation.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lavis.common.errors import DataError

# With nccl, small control messages (stop flags, run names, evaluation records) go through a gloo group
# on the CPU: an nccl collective would need GPU copies and a ``.item()`` that stalls the CUDA stream.
_control_group = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> the torch device of this rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            from lavis.common.errors import ConfigError

            raise ConfigError("run.device: cuda was requested but no CUDA device is available (use cpu or auto)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: the CPU does (slowly, correctly); a GPU from compute
    capability 8.0 (A100, H100). The one answer for ``run.amp: bf16`` and ``model.frozen_dtype: bfloat16``."""
    device = torch.device(device)
    if device.type == "cuda":
        # including_emulation=False: a V100 "supports" bf16 only through slow emulation.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def init_distributed(requested_device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group started by torchrun (gloo on CPU, nccl on CUDA), or run alone.

    Idempotent: a second call reuses the existing group.
    """
    global _control_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        if backend == "nccl":
            _control_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when alone)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; returns at once in a single process."""
    if is_distributed():
        dist.barrier()


def destroy(wait: bool = True) -> None:
    """Leave the process group, if any (idempotent).

    With ``wait`` (a normal exit) once every rank got here; without it (after an error,
    when peers may be dead or stuck in another collective) at once.
    """
    global _control_group
    if dist.is_available() and dist.is_initialized():
        if wait:
            # A rank that leaves right after sending its part of a broadcast or gather can close the
            # connection before the receiving rank has read it; the barrier makes leaving safe.
            barrier()
        dist.destroy_process_group()
    _control_group = None


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]


def gather_objects(obj, dst: int = 0) -> list | None:
    """``[obj of each rank]`` on rank ``dst``; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_control_group)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a SIGTERM seen by one rank).

    A CPU collective: it never waits for the GPU, so calling it every step costs no stall.
    """
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def sum_over_ranks(value: int) -> int:
    """The sum of an integer count over ranks (a CPU collective, like ``any_rank``)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control_group)
    return int(t.item())


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a copy; ``t`` itself is untouched)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def gather_records(records: list[dict], dst: int = 0) -> list[dict] | None:
    """Every rank's evaluation records concatenated on rank ``dst`` (None elsewhere), in memory."""
    per_rank = gather_objects(list(records), dst=dst)
    if per_rank is None:
        return None
    return [r for rank_records in per_rank for r in rank_records]


def dedup_records(records: Iterable[dict], key: str) -> list[dict]:
    """Records with a unique ``key``, first occurrence kept.

    A DistributedSampler pads the last shard with repeated samples, so the same id
    legitimately appears more than once; a dict keeps this linear in the record count.
    """
    unique: dict = {}
    for i, record in enumerate(records):
        if key not in record:
            raise DataError(f"evaluation record #{i} has no sample id key {key!r}: {_short(record)}")
        unique.setdefault(record[key], record)
    return list(unique.values())


def check_coverage(records: list[dict], key: str, expected_ids: Iterable, where: str, show: int = 5) -> None:
    """Raise a DataError unless the records hold every expected id exactly once and nothing else."""
    seen: dict = {}
    for record in records:
        seen[record[key]] = seen.get(record[key], 0) + 1
    expected = list(expected_ids)
    expected_set = set(expected)
    missing = [i for i in expected if i not in seen]
    extra = [i for i in seen if i not in expected_set]
    repeated = [i for i, n in seen.items() if n > 1]
    if not (missing or extra or repeated):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:show]})")
    if extra:
        parts.append(f"{len(extra)} not in the dataset (e.g. {extra[:show]})")
    if repeated:
        parts.append(f"{len(repeated)} repeated (e.g. {repeated[:show]})")
    raise DataError(
        f"{where}: evaluation records do not cover the split exactly once by {key!r}: "
        f"{'; '.join(parts)}; {len(seen)} ids predicted, {len(expected_set)} expected"
    )


def _short(obj, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def wrap_ddp(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False):
    """``model`` in DistributedDataParallel, syncing only the parameters that train."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Frozen weights are loaded identically on every rank; broadcasting a frozen 7B LM at start-up
    # would only cost time and memory.
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        # Buffers of these models are constants (e.g. rotary frequencies); syncing them every forward is waste.
        **_no_forward_buffer_sync(),
    )


def _no_forward_buffer_sync() -> dict:
    # Recent torch renamed broadcast_buffers (and warns on the old name); older versions only know the old one.
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}

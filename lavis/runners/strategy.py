"""How the replicas of a training run share the work: ``run.strategy: ddp | fsdp``.

- ``ddp``: every process holds the whole model; the gradients of the parameters that train are
  all-reduced (DistributedDataParallel, frozen weights ignored). Best while the model fits one device.
- ``fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``). Every parameter, frozen or not, is
  sharded over the processes (a DTensor) and all-gathered only around the forward and backward of its unit;
  gradients are reduce-scattered, so each process keeps 1/world of the weights, gradients and optimizer
  state. Units: each LM decoder layer with the cross-attention block that runs right before it, the
  perceiver, the vision tower's blocks (when it trains or is large) and the root (embeddings, head, norms).
  FSDP2 shards per parameter, so one unit mixes frozen LM weights and trainable LoRA / cross-attention
  weights: nothing is unfrozen to make hooks fire, and frozen weights get no gradient.

The runner talks to a ``TrainingStrategy`` only: wrap, gradient sync on/off per micro-batch, finishing
the gradients, clipping, the trainable state (gathered in full) and checkpoint style.
"""

from __future__ import annotations

import contextlib
import datetime
import logging

import torch
import torch.distributed as tdist
from torch import nn

from lavis.common import dist
from lavis.common.errors import CheckpointError, ConfigError
from lavis.models.base import TrainableModel
from lavis.models.flamingo.flamingo import Flamingo
from lavis.runners import checkpoint as ckpt
from lavis.runners.precision import Precision

log = logging.getLogger(__name__)

# The vision tower is sharded when it trains or has at least this many parameters (ViT-L/14: 304M).
LARGE_VISION_PARAMS = 100_000_000


class TrainingStrategy:
    """DDP: the default strategy (a no-op in a single process)."""

    name = "ddp"
    # Whether step checkpoints are DCP directories written by every rank (sharded_checkpoint.py).
    sharded_checkpoints = False

    def __init__(self, run, precision: Precision, dist_info: dist.DistInfo):
        self.run = run
        self.precision = precision
        self.dist_info = dist_info

    def place(self, model: nn.Module) -> nn.Module:
        """Put the freshly built model on this rank's device (before ``wrap``)."""
        return model.to(self.dist_info.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train through (``model`` itself when there is nothing to wrap)."""
        if not self.dist_info.distributed:
            return model
        return dist.wrap_ddp(model, self.dist_info.device, self.run.find_unused_parameters)

    def gradient_sync(self, wrapped_model: nn.Module, enabled: bool):
        """Context for one micro-batch's forward/backward: with ``enabled`` False no gradient is communicated."""
        from torch.nn.parallel import DistributedDataParallel

        if enabled or not isinstance(wrapped_model, DistributedDataParallel):
            return contextlib.nullcontext()
        return wrapped_model.no_sync()

    def finish_gradients(self, params: list[torch.Tensor]) -> None:
        """Called once per step after the last backward (the reduction already happened under DDP)."""

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm of ``params`` to ``max_norm``; the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler (disabled, a pass-through, for fp32 and bf16)."""
        return self.precision.grad_scaler()

    def trainable_state_dict(self, model: TrainableModel) -> dict[str, torch.Tensor]:
        """Full CPU copies of the trainable weights. Under fsdp a collective: every rank must call it."""
        return ckpt.trainable_state_dict(model)

    def gather_trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """``trainable_state_dict`` on rank 0, None elsewhere; every rank calls it (a collective under fsdp)."""
        if self.sharded_checkpoints:
            sd = self.trainable_state_dict(model)
            return sd if self.dist_info.is_main else None
        return self.trainable_state_dict(model) if self.dist_info.is_main else None

    def load_trainable_state_dict(self, model: nn.Module, sd: dict, source: str) -> None:
        """Load full trainable weights (a best.pt or single-file checkpoint) into the (wrapped) model."""
        ckpt.load_trainable_state_dict(model, sd, source)


class FSDPStrategy(TrainingStrategy):
    """FSDP2 sharding; see the module docstring."""

    name = "fsdp"
    sharded_checkpoints = True

    def __init__(self, run, precision: Precision, dist_info: dist.DistInfo):
        super().__init__(run, precision, dist_info)
        self.replicated: list[nn.Parameter] = []  # trainable parameters kept out of sharding (AdaLoRA)

    def place(self, model: nn.Module) -> nn.Module:
        # Training: the model stays where it was built; fully_shard moves each unit to the device as it shards
        # it, so the device never holds more than one unit in full (full fine-tuning of a 9B model would not
        # fit a V100 whole). Evaluation-only runs are not sharded (see the README).
        self._check(model)  # at start-up, before any work
        return model.to(self.dist_info.device) if self.run.evaluate else model

    def _check(self, model: nn.Module) -> None:
        from lavis.models.language_model import is_quantized

        if isinstance(model, Flamingo) and is_quantized(model.lang_encoder):
            raise ConfigError(
                "run.strategy=fsdp cannot shard a bitsandbytes-quantised language model; use "
                "run.strategy=ddp (a 4/8-bit frozen LM with LoRA fits one GPU) or model.quantization=null"
            )
        stored = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if self.precision.dtype is None and len(stored) > 1:
            raise ConfigError(
                f"run.strategy=fsdp with run.amp=fp32: the model stores parameters in {sorted(map(str, stored))}; "
                "FSDP gathers a unit in one dtype, so use run.amp=bf16 (or fp16 on CUDA) with a half-precision "
                "model.frozen_dtype, or model.frozen_dtype=float32"
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        self._check(model)
        _ensure_process_group(self.dist_info)
        mesh = init_device_mesh(self.dist_info.device.type, (self.dist_info.world_size,))
        mp_policy = self._mp_policy(model)
        # As DDP does: every rank starts from rank 0's trainable weights (randomly initialised adapters and
        # Flamingo parts may differ between processes); frozen weights are loaded identically everywhere.
        # The model is still where it was built (see place); nccl broadcasts from the device, one tensor at a time.
        if self.dist_info.world_size > 1:
            for p in (p for p in model.parameters() if p.requires_grad):
                on_device = p.data.to(self.dist_info.device)
                tdist.broadcast(on_device, src=0)
                if on_device is not p.data:
                    p.data.copy_(on_device)
        # AdaLoRA masks and scores its ranks on whole tensors (peft's update_and_allocate), which shards
        # would break; these small tensors stay whole on every rank and their gradients are all-reduced.
        # fully_shard moves what it manages to the device; these it leaves alone, so they are moved here.
        self.replicated = replicated_parameters(model)
        for p in self.replicated:
            p.data = p.data.to(self.dist_info.device)
        ignored = set(self.replicated) or None
        units = shard_units(model, self.run.fsdp_shard_vision)
        reshard = bool(self.run.fsdp_reshard_after_forward)
        for modules in units:
            fully_shard(
                modules if len(modules) > 1 else modules[0],
                mesh=mesh,
                reshard_after_forward=reshard,
                mp_policy=mp_policy,
                ignored_params=ignored,
            )
        # The root's parameters (embeddings, head, final norm, rest of the vision tower) are gathered for the
        # whole forward; its reshard-after-forward saves nothing, as backward needs them at once.
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy, ignored_params=ignored)
        # generate() calls the LM many times outside forward(): it must gather the root's parameters too.
        if isinstance(model, TrainableModel):
            register_fsdp_forward_method(model, "generate")
        if isinstance(model, Flamingo):
            # HF generate() then keeps every rank stepping until all are done (synced_gpus), as each decoding
            # step gathers shards; this is the flag transformers' own FSDP2 setup sets.
            model.lang_encoder._is_fsdp_managed_module = True
        log.info(
            "fsdp: %d unit(s) + root over %d process(es), reshard_after_forward=%s, param dtype %s%s",
            len(units),
            self.dist_info.world_size,
            reshard,
            mp_policy.param_dtype or "as stored",
            f", {len(self.replicated)} AdaLoRA tensor(s) replicated" if self.replicated else "",
        )
        return model

    def _mp_policy(self, model: nn.Module):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = self.precision.dtype
        if dtype is None:
            return MixedPrecisionPolicy()
        # Compute in the autocast dtype; gradients are reduced in float32 and the optimizer updates the
        # float32 shards (master weights).
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def gradient_sync(self, wrapped_model: nn.Module, enabled: bool):
        # Without sync the unsharded gradients accumulate locally; the reduce-scatter runs on the last micro-batch.
        wrapped_model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def finish_gradients(self, params: list[torch.Tensor]) -> None:
        if not self.replicated or self.dist_info.world_size == 1:
            return
        for p in self.replicated:  # the mean over ranks, as DDP and FSDP's reduce-scatter (gloo has no AVG)
            if p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad.div_(self.dist_info.world_size)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]
        squares = []
        if sharded:
            # The norm of a sharded gradient is a partial value per rank; full_tensor() reduces it.
            squares.append(torch.nn.utils.get_total_norm(sharded, 2.0).full_tensor() ** 2)
        if whole:
            squares.append(torch.nn.utils.get_total_norm(whole, 2.0) ** 2)
        if not squares:
            return torch.zeros((), device=self.dist_info.device)
        total = torch.stack(squares).sum().sqrt()
        for group in (sharded, whole):
            if group:
                scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
                torch._foreach_mul_(group, scale.to(group[0].dtype))
        return total

    def grad_scaler(self):
        if self.precision.amp != "fp16":
            return self.precision.grad_scaler()
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # Agrees across ranks on an inf/NaN found in any rank's shard, so that all skip the same steps.
        return ShardedGradScaler(self.dist_info.device.type)

    def trainable_state_dict(self, model: TrainableModel) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        sd = model.trainable_state_dict()
        return {
            name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)
            for name, t in sd.items()
        }

    def load_trainable_state_dict(self, model: nn.Module, sd: dict, source: str) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # Names and shapes are checked against the full (global) shapes, as for an unsharded model.
        missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
        bad = [n for n in set(params) & set(sd) if tuple(sd[n].shape) != tuple(params[n].shape)]
        if missing or unexpected or bad:
            raise CheckpointError(
                f"{source}: the weights do not fit the model's trainable parameters: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, other shape {sorted(bad)[:5]}"
            )
        with torch.no_grad():
            for name, p in params.items():
                value = sd[name].to(device=p.device, dtype=p.dtype)
                if isinstance(p, DTensor):
                    # Every rank holds the full tensor: take the local shard without communication.
                    value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                p.copy_(value)


def build_strategy(run, precision: Precision, dist_info: dist.DistInfo) -> TrainingStrategy:
    """The strategy ``run.strategy`` names (the run schema's Literal admits only ddp and fsdp)."""
    return (
        FSDPStrategy(run, precision, dist_info)
        if run.strategy == "fsdp"
        else TrainingStrategy(run, precision, dist_info)
    )


# --- the sharding plan -----------------------------------------------------------------------------------


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters FSDP must leave whole: those of AdaLoRA adapters (see FSDPStrategy.wrap)."""
    from lavis.models.adalora import is_adalora
    from lavis.models.adapters import peft_models

    out = []
    for wrapper in peft_models(model).values() if isinstance(model, Flamingo) else ():
        if is_adalora(wrapper):
            out += [p for n, p in wrapper.named_parameters() if p.requires_grad and "lora_" in n]
    return out


def shard_units(model: nn.Module, shard_vision: bool | None = None) -> list[list[nn.Module]]:
    """The FSDP units below the root: lists of modules sharded (gathered, freed) together.

    For a Flamingo network: ``[decoder layer i, cross-attention block i]`` for every layer (the block runs in
    the layer's pre-hook, so they are gathered together), the perceiver, and each block of the vision tower
    when it trains or is large (``shard_vision`` None), always (True) or never (False). Any other model: its
    direct children. Units that share a parameter (tied weights) are merged into one unit.
    """
    if not isinstance(model, Flamingo):
        units = [[child] for child in model.children() if any(True for _ in child.parameters())]
        return merge_tied(units)
    from lavis.models.flamingo.flamingo import decoder_layers

    units = []
    for i, layer in enumerate(decoder_layers(model.lang_encoder)):
        block = model.gated_cross_attn_layers[str(i)] if str(i) in model.gated_cross_attn_layers else None
        units.append([layer] if block is None else [layer, block])
    units.append([model.perceiver])
    vision = model.vision_encoder
    n_vision = sum(p.numel() for p in vision.parameters())
    trains = any(p.requires_grad for p in vision.parameters())
    if shard_vision or (shard_vision is None and (trains or n_vision >= LARGE_VISION_PARAMS)):
        blocks = getattr(getattr(vision, "transformer", None), "resblocks", None)
        units += [[b] for b in blocks] if blocks is not None else [[vision]]
    return merge_tied(units)


def merge_tied(units: list[list[nn.Module]]) -> list[list[nn.Module]]:
    """Merge units that hold the same parameter object (tied weights must live in one FSDP group).

    Weights tied to something left with the root (e.g. a tied embedding and LM head) stay with the root.
    """
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, unit in enumerate(units):
        for p in (p for module in unit for p in module.parameters()):
            parent[find(i)] = find(owner.setdefault(id(p), i))
    groups: dict[int, list[nn.Module]] = {}
    for i, unit in enumerate(units):
        groups.setdefault(find(i), []).extend(unit)
    return list(groups.values())


def _ensure_process_group(dist_info: dist.DistInfo) -> None:
    # FSDP needs a process group even in a single process (torchrun with 1 process, or plain python):
    # a group of one keeps the code path and the DTensor state the same as with several processes.
    if tdist.is_initialized():
        return
    if dist_info.world_size != 1:
        raise RuntimeError("run.strategy=fsdp: the process group was not initialised")
    backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
    tdist.init_process_group(
        backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=600)
    )

"""Parameter-efficient adapters (HF peft) and the freezing policy of the Flamingo network.

`apply_trainable_policy` freezes everything, injects peft adapters into the chosen parts IN PLACE (the
language model keeps its original module names, e.g. `lang_encoder.model.layers.0.self_attn.q_proj`,
so the cross-attention hooks and the checkpoint names of the network stay valid), then unfreezes the
parts the TrainableConfig asks for. The peft wrapper objects are kept on the model in a plain dict
(not registered as submodules, so no parameter is listed twice); they are what saves the LM adapter in
peft's own format and what drives AdaLoRA's rank allocation. The export (`save_adapter`,
`merge_and_export`) is in adapter_export.py and is forwarded from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lavis.common.errors import ConfigError
from lavis.common.schema import Validated, config_instance
from lavis.common.special_tokens import END_OF_CHUNK, MEDIA_TOKEN
from lavis.models.base import TrainableModel
from lavis.models.language_model import is_quantized

logger = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "ia3", "loha", "lokr", "adalora")
ADAPTABLE_PARTS = ("lang_encoder", "gated_cross_attn_layers", "perceiver")
NEW_TOKENS = (END_OF_CHUNK, MEDIA_TOKEN)  # the added tokens whose embedding rows learn; PAD_TOKEN never does

_PEFT_MODELS_ATTR = "_pet_peft_models"  # {part name: peft.PeftModel}, a plain dict on the Flamingo module
_ROWS_ATTR = "_pet_trainable_rows"  # on the nn.Embedding: the row ids its gradient mask lets through
_HOOK_ATTR = "_pet_row_mask_hook"


@dataclass
class AdapterConfig(Validated):
    """Which peft method to inject, with which hyper-parameters, into which parts of Flamingo."""

    method: Optional[str] = None  # lora | ia3 | loha | lokr | adalora; None = no adapter
    r: int = 8  # rank (lora, loha, lokr); AdaLoRA's initial rank
    alpha: int = 16  # scale: lora/adalora lora_alpha (update x alpha / r), loha/lokr alpha; unused by ia3
    dropout: float = 0.05  # lora/adalora: input dropout; loha/lokr: rank dropout; unused by ia3
    # Modules adapted in lang_encoder; null = the LM family's default (LLaMA: q_proj, v_proj; MPT and
    # MosaicGPT: Wqkv, out_proj, up_proj, down_proj; GPT-NeoX: query_key_value, dense, dense_h_to_4h, dense_4h_to_h).
    target_modules: Optional[list[str]] = None
    modules_to_save: Optional[list[str]] = None  # LM modules trained fully and saved with the adapter
    # Parts that get adapters: lang_encoder, gated_cross_attn_layers, perceiver.
    apply_to: list[str] = field(default_factory=lambda: ["lang_encoder"])
    # The Flamingo-specific parts name their layers differently from LLaMA.
    xattn_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_kv", "to_out"])
    # Modules adapted in the Perceiver resampler (when apply_to has perceiver).
    perceiver_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_kv", "to_out"])
    # ia3: the targets whose INPUT is rescaled (feed-forward outputs); each part uses those among its targets.
    feedforward_modules: list[str] = field(default_factory=list)
    # adalora: ranks shrink from r to target_r on average between step tinit and total_step - tfinal.
    target_r: int = 4
    total_step: Optional[int] = None  # adalora (required): total optimizer steps of the training run
    tinit: int = 0  # adalora: warm-up optimizer steps before ranks start to shrink
    tfinal: int = 0  # adalora: last optimizer steps, trained at the final ranks (tinit + tfinal < total_step)
    deltaT: int = 1  # adalora: optimizer steps between two rank re-allocations
    orth_reg_weight: float = 0.5  # adalora: weight of the orthogonality penalty added to the loss (0 = none)

    def validate(self, path: str) -> list[str]:
        """What peft would refuse, or what would train the wrong thing, as dotted-key problems."""
        problems = []
        if self.method is not None and self.method not in ADAPTER_METHODS:
            problems.append(
                f"{path}.method: unknown method {self.method!r}; known methods: {', '.join(ADAPTER_METHODS)}"
            )
        bad_parts = [p for p in self.apply_to if p not in ADAPTABLE_PARTS]
        if bad_parts:
            problems.append(f"{path}.apply_to: unknown part(s) {bad_parts}; known parts: {', '.join(ADAPTABLE_PARTS)}")
        if self.r <= 0:
            problems.append(f"{path}.r: must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{path}.dropout: must be in [0, 1), got {self.dropout}")
        if self.method == "adalora":
            if self.total_step is None or self.total_step <= 0:
                problems.append(f"{path}.total_step: AdaLoRA needs the total number of optimizer steps (positive)")
            elif self.tinit + self.tfinal >= self.total_step:
                problems.append(
                    f"{path}.tinit + {path}.tfinal ({self.tinit} + {self.tfinal}) must be below "
                    f"{path}.total_step ({self.total_step})"
                )
            elif self.total_step - self.tfinal < 2:
                # peft fixes the ranks at step total_step - tfinal from the importance scores of the steps
                # before it; with none before it (the runner's first step is 1) it fails with a KeyError.
                problems.append(
                    f"{path}.total_step - {path}.tfinal ({self.total_step} - {self.tfinal}) must be at least 2: "
                    f"AdaLoRA's final rank allocation needs an earlier optimizer step to score the ranks"
                )
            if not 0 < self.target_r <= self.r:
                problems.append(f"{path}.target_r: must be in [1, r={self.r}], got {self.target_r}")
        if self.method == "ia3":
            targets = {*(self.target_modules or ()), *self.xattn_target_modules, *self.perceiver_target_modules}
            stray = [m for m in self.feedforward_modules if m not in targets]
            if stray:
                problems.append(f"{path}.feedforward_modules: {stray} are not in any part's target modules")
        return problems


@dataclass
class TrainableConfig:
    """Which non-adapter parts train. The vision encoder is always frozen."""

    perceiver: bool = True  # train the whole Perceiver resampler
    gated_cross_attn: bool = True  # train every gated cross-attention block (their gates start at 0)
    new_token_embeddings: bool = True  # only the rows of <|endofchunk|> and <image>
    lm_embeddings: bool = False  # every row of the LM's input embedding
    # Full fine-tuning: every weight of the language model trains (its memory calls for run.strategy=fsdp).
    lang_encoder: bool = False


def _targets_of(cfg: AdapterConfig, part: str, lm_default: tuple[str, ...] = ()) -> list[str]:
    return list(
        {
            "lang_encoder": cfg.target_modules if cfg.target_modules is not None else lm_default,
            "gated_cross_attn_layers": cfg.xattn_target_modules,
            "perceiver": cfg.perceiver_target_modules,
        }[part]
    )


def build_peft_config(cfg: AdapterConfig, part: str, lm_default: tuple[str, ...] = ("q_proj", "v_proj")):
    """The peft config object of `cfg.method` for one part of Flamingo (`lm_default`: the LM family's targets)."""
    import peft

    targets = _targets_of(cfg, part, lm_default)
    common: dict[str, Any] = {"target_modules": targets}
    if part == "lang_encoder":
        # CAUSAL_LM makes the saved adapter reload as PeftModelForCausalLM onto a plain LLaMA.
        common["task_type"] = peft.TaskType.CAUSAL_LM
        common["modules_to_save"] = list(cfg.modules_to_save) if cfg.modules_to_save else None
    if cfg.method == "lora":
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, **common)
    if cfg.method == "loha":
        return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout, **common)
    if cfg.method == "lokr":
        return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout, **common)
    if cfg.method == "ia3":
        feedforward = [m for m in cfg.feedforward_modules if m in targets]
        return peft.IA3Config(feedforward_modules=feedforward, **common)
    if cfg.method == "adalora":
        return peft.AdaLoraConfig(
            init_r=cfg.r,
            target_r=cfg.target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            total_step=cfg.total_step,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            deltaT=cfg.deltaT,
            orth_reg_weight=cfg.orth_reg_weight,
            **common,
        )
    raise ConfigError(f"adapters.method: unknown method {cfg.method!r}; known methods: {', '.join(ADAPTER_METHODS)}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel (or the model itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def peft_models(model: nn.Module) -> dict:
    """{part name: peft.PeftModel} of the adapters injected by apply_trainable_policy (empty if none)."""
    return unwrap_model(model).__dict__.get(_PEFT_MODELS_ATTR, {})


def _part(model: nn.Module, part: str) -> nn.Module:
    try:
        return model.get_submodule(part)
    except AttributeError:
        raise ConfigError(f"adapters.apply_to: the model has no `{part}` module to put an adapter on") from None


def _inject(model: nn.Module, part: str, cfg: AdapterConfig):
    import peft

    module = _part(model, part)
    from lavis.models.flamingo.language_models import family_of_model

    lm_default = family_of_model(_part(model, "lang_encoder")).lora_target_modules
    peft_cfg = build_peft_config(cfg, part, lm_default)
    try:
        # get_peft_model modifies `module` in place; the returned wrapper only points at it.
        return peft.get_peft_model(module, peft_cfg)
    except ValueError as error:  # peft reports unmatched target modules and bad options as ValueError
        raise ConfigError(f"adapters: cannot apply {cfg.method} to {part}: {error}") from error


def _new_token_ids(model: TrainableModel) -> list[int]:
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("trainable.new_token_embeddings needs the model's tokenizer, but the model has none")
    ids = []
    for token in NEW_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(f"trainable.new_token_embeddings: the tokenizer has no added token {token!r}")
        ids.append(int(token_id))
    return ids


def train_embedding_rows(embedding: nn.Embedding, row_ids: list[int]) -> None:
    """Make only `row_ids` of `embedding` learn: a gradient hook zeroes every other row's gradient.

    With zero gradients Adam/AdamW moments stay zero and the update is exactly zero, so the other rows
    stay bit-identical as long as the embedding gets no weight decay (the runner's policy: names
    containing "embed" are not decayed).
    """
    weight = embedding.weight
    keep = torch.zeros(weight.shape[0], 1, dtype=torch.bool)
    keep[torch.tensor(row_ids, dtype=torch.long)] = True

    def mask_gradient(grad: torch.Tensor) -> torch.Tensor:
        # torch.where, not grad * mask: an inf in a frozen row (fp16 overflow) must become 0, not nan.
        return torch.where(keep.to(grad.device), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    old = getattr(embedding, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
    weight.requires_grad_(True)
    setattr(embedding, _HOOK_ATTR, weight.register_hook(mask_gradient))
    setattr(embedding, _ROWS_ATTR, list(row_ids))


def apply_trainable_policy(model: TrainableModel, adapters_cfg=None, trainable_cfg=None) -> TrainableModel:
    """Freeze `model`, inject the adapters of `adapters_cfg`, unfreeze per `trainable_cfg`; return `model`.

    `model` is the Flamingo network (attributes vision_encoder, perceiver, lang_encoder,
    gated_cross_attn_layers, tokenizer). The configs are the model Config's instances (a plain mapping from
    code goes through the one validation, ``schema.config_instance``). Logs the trainable parameter count
    of each part.
    """
    adapters_cfg = config_instance(AdapterConfig, adapters_cfg or {}, "model.adapters")
    trainable_cfg = config_instance(TrainableConfig, trainable_cfg or {}, "model.trainable")
    model = unwrap_model(model)
    if peft_models(model):
        raise RuntimeError("apply_trainable_policy was already applied to this model (adapters are injected)")

    if (trainable_cfg.lm_embeddings or trainable_cfg.new_token_embeddings) and is_quantized(
        _part(model, "lang_encoder")
    ):
        raise ConfigError(
            "trainable: the embeddings of a quantised language model cannot train; set "
            "trainable.new_token_embeddings and trainable.lm_embeddings to false"
        )

    if trainable_cfg.lang_encoder and is_quantized(_part(model, "lang_encoder")):
        raise ConfigError(
            "trainable.lang_encoder: a quantised language model cannot be fully fine-tuned; "
            "set model.quantization to null or train adapters instead"
        )

    model.requires_grad_(False)
    wrappers = {}
    if adapters_cfg.method is not None:
        for part in dict.fromkeys(adapters_cfg.apply_to):
            wrappers[part] = _inject(model, part, adapters_cfg)
    model.__dict__[_PEFT_MODELS_ATTR] = wrappers

    if trainable_cfg.lang_encoder:
        _part(model, "lang_encoder").requires_grad_(True)
    if trainable_cfg.perceiver:
        _part(model, "perceiver").requires_grad_(True)
    if trainable_cfg.gated_cross_attn:
        _part(model, "gated_cross_attn_layers").requires_grad_(True)
    for part, flag in (
        ("perceiver", trainable_cfg.perceiver),
        ("gated_cross_attn_layers", trainable_cfg.gated_cross_attn),
    ):
        if flag and part in wrappers:
            logger.warning(
                "%s trains fully AND carries %s adapters; the adapters are redundant",
                part,
                adapters_cfg.method,
            )

    embedding = _part(model, "lang_encoder").get_input_embeddings()
    if trainable_cfg.lm_embeddings:
        embedding.weight.requires_grad_(True)
    elif trainable_cfg.new_token_embeddings:
        train_embedding_rows(embedding, _new_token_ids(model))

    summary = trainable_parameter_summary(model)
    lines = [f"  {part}: {n['trainable']:,} / {n['total']:,}" for part, n in summary.items()]
    logger.info("trainable parameters (adapter %s):\n%s", adapters_cfg.method, "\n".join(lines))
    return model


def _owner_part(name: str) -> str:
    head = name.split(".", 1)[0]
    return head if head in ("vision_encoder", *ADAPTABLE_PARTS) else "other"


def trainable_parameter_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "total": m}} per top-level part plus "total".

    An embedding whose gradient is masked to a few rows counts only those rows as trainable.
    """
    model = unwrap_model(model)
    masked = {}
    for module in model.modules():
        # _ROWS_ATTR is our own tag on a torch nn.Embedding (set with its gradient mask); torch declares no slot.
        if isinstance(module, nn.Embedding) and hasattr(module, _ROWS_ATTR):
            masked[id(module.weight)] = len(getattr(module, _ROWS_ATTR)) * module.weight.shape[1]
    summary: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():  # named_parameters already skips shared duplicates
        counts = summary.setdefault(_owner_part(name), {"trainable": 0, "total": 0})
        counts["total"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += masked.get(id(param), param.numel())
    summary["total"] = {k: sum(c[k] for c in summary.values()) for k in ("trainable", "total")}
    return summary


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: detached tensor} of every parameter that requires grad (adapters + the policy's parts).

    The one implementation (``Flamingo.trainable_state_dict`` delegates here). The tensors share storage
    with the parameters, so no device memory is spent on a copy; a caller that keeps them across training
    steps copies them (the runner's checkpoint moves them to the CPU).
    """
    return {n: p.detach() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}

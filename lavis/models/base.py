"""What the runner, the checkpoints and evaluation ask of a model: ``TrainableModel``.

A model subclasses it and overrides what it has; the defaults are no-ops, so the runner
calls every hook unconditionally (no ``hasattr`` probing). Besides these methods a model has
``forward(vision_x, lang_x, attention_mask=None, labels=None, **kwargs)`` returning an output
with ``.logits`` and, with labels, ``.loss`` (the mean over the targets, or the sum divided by
``num_items_in_batch`` when given, as HF causal LMs do); with ``loss_only=True`` and labels (what
``BaseTask.train_step`` asks), the same ``.loss`` with logits at the labelled positions only; and the
attributes ``tokenizer`` and ``image_processor``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lavis.common.errors import CheckpointError
from lavis.common.schema import Validated


@dataclass
class ModelConfig(Validated):
    """The keys every ``model`` section has; a model class's ``Config`` subclasses it with its own options."""

    arch: Optional[str] = None  # the registered model class (e.g. openflamingo)
    model_type: Optional[str] = None  # the default YAML lavis/configs/models/<arch>/<model_type>.yaml

    def input_image_size(self) -> Optional[int]:
        """The image side in pixels the model takes, when its config tells (checked against the datasets)."""
        return None


class TrainableModel(nn.Module):
    """Base of every registered model; see the module docstring."""

    #: HF tokenizer with the model's special tokens (set by the model's builder).
    tokenizer: Any = None
    #: PIL image -> tensor (C, H, W) as the vision tower expects (set by the model's builder).
    image_processor: Optional[Callable] = None

    # --- weights the runner saves and loads ----------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of every parameter that trains (``requires_grad``); shares storage with them."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` saved; strict on names and shapes (a CheckpointError)."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        bad_shape = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(params[k].shape)}"
            for k in sorted(set(params) & set(state_dict))
            if state_dict[k].shape != params[k].shape
        ]
        if missing or unexpected or bad_shape:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} trainable parameters: {', '.join(missing[:10])}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} entries (not trainable here): {', '.join(unexpected[:10])}")
            if bad_shape:
                parts.append("shape mismatch: " + "; ".join(bad_shape[:10]))
            raise CheckpointError("trainable state dict does not fit the model: " + " | ".join(parts))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state_dict[name])

    # --- training hooks ------------------------------------------------------------------------------

    def training_loss_extras(self) -> Optional[torch.Tensor]:
        """Terms added to the training loss by ``forward`` in training mode (e.g. a regulariser); None = none."""
        return None

    def optimizer_step_hook(self) -> Optional[Callable[[int], None]]:
        """``hook(global_step)`` called after each optimizer step that was taken, before zero_grad; None = none."""
        return None

    def training_state(self) -> dict:
        """Training state that is not a parameter (saved in checkpoints); {} = none."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state`; a model without such state refuses a non-empty one."""
        if state:
            raise CheckpointError(
                f"the checkpoint holds model training state {sorted(state)} that this model does not have"
            )

    # --- evaluation ----------------------------------------------------------------------------------

    def generate(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """The NEW token ids (B * num_return_sequences, N_new), padded with the pad id after eos."""
        raise NotImplementedError(f"{type(self).__name__} does not generate text")

    def score(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        continuations,
        normalize_length: bool = True,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """(B, C) log-likelihood of each continuation (token-id list) after each left-padded context row:
        the mean per token when ``normalize_length``, else the sum (lavis/models/flamingo/scoring.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not score text")

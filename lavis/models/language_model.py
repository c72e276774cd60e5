"""Loading the frozen language model: precision, bitsandbytes quantisation, device checks.

The language model is the largest part of Flamingo (LLaMA-7B), so it is loaded once, straight into
the requested dtype (or quantised on load): never a float32 copy first and a cast afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional, Union

import torch

from lavis.common.dist import bf16_supported
from lavis.common.errors import ConfigError

logger = logging.getLogger(__name__)

QUANTIZATION_MODES = ("8bit", "4bit")

# The names model.frozen_dtype documents (the Config's Literal); torch.dtype values are accepted as well.
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """Turn a config value ("float16", "bfloat16", torch.float32, None = float32) into a torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ConfigError(
                f"dtype {dtype} is not supported for the language model; use one of float32, float16, bfloat16"
            )
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {dtype!r}; known names: {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[name]


def check_dtype_supported(dtype: torch.dtype, device: Union[str, torch.device]) -> None:
    """Raise ConfigError when `device` cannot compute in `dtype` natively (bf16 on a V100, say)."""
    device = torch.device(device)
    if dtype != torch.bfloat16 or device.type != "cuda":
        # CPUs run bf16 (slowly but correctly); fp16/fp32 run everywhere we support.
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"dtype bfloat16 was requested on {device}, but CUDA is not available on this machine")
    if not bf16_supported(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"dtype bfloat16 was requested but the GPU ({name}) has no native bfloat16 support; "
            "use float16 (with loss scaling) or float32 instead"
        )


def check_quantization_available(quantization: Optional[str]) -> None:
    """Raise ConfigError unless `quantization` (None, "8bit" or "4bit") can run on this machine."""
    if quantization is None:
        return
    if quantization not in QUANTIZATION_MODES:
        raise ConfigError(
            f"quantization={quantization!r} is not supported; use one of {', '.join(QUANTIZATION_MODES)} or null"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes kernels), but CUDA is not available "
            "on this machine; set quantization to null to load the language model unquantised"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"quantization={quantization!r} needs the bitsandbytes package, which is not installed; "
            "install it with `pip install 'pet-vlm[gpu]'` or set quantization to null"
        )


def _bnb_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # QLoRA's recipe: NF4 storage, double quantisation of the scales, matmuls in the training dtype.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_language_model(
    path: str,
    torch_dtype: Union[str, torch.dtype, None] = None,
    quantization: Optional[str] = None,
):
    """Load a causal LM from the local directory `path` (never the network) in `torch_dtype`.

    `quantization` is None, "8bit" or "4bit" (bitsandbytes; needs CUDA). The model loads on the CPU, or
    quantised on the current GPU. Every problem the user can fix is raised as ConfigError before any weight
    is read.
    """
    from transformers import AutoModelForCausalLM

    if not path or not os.path.isdir(path):
        raise ConfigError(f"language model path {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"language model directory {path!r} has no config.json (expected a HF model directory)")
    dtype = resolve_dtype(torch_dtype)
    check_quantization_available(quantization)
    kwargs = {"dtype": dtype, "local_files_only": True}
    if quantization is None:
        check_dtype_supported(dtype, torch.device("cpu"))
    else:
        device = torch.cuda.current_device()  # bitsandbytes weights live on the GPU from the start
        check_dtype_supported(dtype, torch.device("cuda", device))
        kwargs["device_map"] = {"": device}
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load the language model from {path!r}: {error}") from error
    logger.info("loaded language model %s (dtype=%s, quantization=%s)", path, dtype, quantization)
    return model


def is_quantized(model) -> bool:
    """True when `model` holds bitsandbytes-quantised weights (8-bit or 4-bit)."""
    # transformers 5 marks a quantised model by its hf_quantizer; older versions by is_loaded_in_{8,4}bit.
    return bool(
        getattr(model, "hf_quantizer", None) is not None
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_loaded_in_4bit", False)
    )

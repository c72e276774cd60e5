"""Preflight: every local file a config names that is missing, found before anything is built.

A real run needs model weights and data files at paths that come from environment
variables or ``--options``; the builders would each stop at their first missing
file. This lists them all, each with the key, the path and how to set it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Local files named by the openflamingo model section: key -> (what it is, the variable the builder falls back to).
_MODEL_FILES = {
    "tokenizer_path": ("tokenizer directory", "LLAMA_PATH"),
    "lang_encoder_path": ("language model directory", "LLAMA_PATH"),
    "pretrained_checkpoint_path": ("OpenFlamingo checkpoint.pt", None),
    "clip_vision_encoder_pretrained": ("CLIP vision weights file", None),
}
_ENV_REFERENCE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_SPLIT_NAMES = {"train", "val", "test", "restval", "dev"}


def raw_config(cfg_path, options) -> dict:
    """The merged config before interpolations are resolved, to tell which keys read which variables."""
    from omegaconf import OmegaConf

    from lavis.common.config import merge_config

    return OmegaConf.to_container(merge_config(cfg_path, options), resolve=False)


def _raw_value(raw: dict | None, key_path: str):
    node = raw
    for part in key_path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _env_names(raw_value) -> list[str]:
    return _ENV_REFERENCE.findall(raw_value) if isinstance(raw_value, str) else []


def _model_file_problems(model, raw: dict | None) -> list[str]:
    if model.get("arch") != "openflamingo":
        return []
    problems = []
    for key, (what, fallback) in _MODEL_FILES.items():
        if fallback == "LLAMA_PATH":  # the model type names its LM's variable (MPT7B_PATH, ...)
            fallback = model.get("lang_encoder_env", fallback)
        key_path = f"model.{key}"
        value = model.get(key)
        declared = _env_names(_raw_value(raw, key_path))
        variables = list(dict.fromkeys(declared + ([fallback] if fallback else [])))
        how = f"--options {key_path}=PATH" + "".join(f" or the {v} environment variable" for v in variables)
        if value is None:
            if fallback and os.environ.get(fallback):
                value = os.environ[fallback]
            elif fallback or declared:
                # Required (the builder needs it), or the config reads it from a variable that is unset:
                # running on would silently use random weights.
                unset = f" ({', '.join(declared)} is not set)" if declared else ""
                problems.append(f"{key_path}: the {what} is not set{unset}; give it with {how}")
                continue
            else:
                continue
        if value == "tiny":
            continue
        is_path = key != "clip_vision_encoder_pretrained" or "/" in value or value.endswith(_WEIGHT_SUFFIXES)
        if is_path and not Path(value).exists():
            problems.append(f"{key_path}: the {what} {value!r} does not exist; give it with {how}")
    return problems


def _walk_build_info(node: dict, key_path: str, section: dict, raw, problems: list) -> None:
    """Every missing file under ``node``, skipping what the section does not read.

    A split that is not built needs nothing. With ``data_type: webdataset`` images come from the shards
    and so does split membership (``karpathy_file``); a train-role split read from shards needs no raw
    file at all, an eval-role one only the files that score it (ground truth, questions).
    """
    splits = set(section.get("splits") or [])
    from_shards = section.get("data_type", "images") == "webdataset"
    train_role = set(section.get("train_splits") or []) if from_shards else set()
    for key, value in node.items():
        path = f"{key_path}.{key}"
        if key in _SPLIT_NAMES and (key not in splits or key in train_role):
            continue
        if key in ("shards", "image_name_format") or (from_shards and key in ("images", "karpathy_file")):
            continue  # shard patterns are expanded and checked by the shard reader
        if isinstance(value, dict):
            _walk_build_info(value, path, section, raw, problems)
        elif isinstance(value, str) and value and not Path(value).exists():
            variables = _env_names(_raw_value(raw, path))
            origin = "".join(
                f" (built from {v}, which is {'unset' if v not in os.environ else repr(os.environ[v])})"
                for v in variables
            )
            how = "".join(f"set {v} to the data root or " for v in variables)
            problems.append(f"{path}: {value} does not exist{origin}; {how}give it with --options {path}=PATH")


def _data_file_problems(datasets, raw: dict | None) -> list[str]:
    problems: list[str] = []
    for name, section in datasets.items():
        build_info = section.get("build_info")
        # Builders that read one folder or file outside build_info (imagenet: root, classnames_file).
        top_level = {key: section[key] for key in ("root", "classnames_file") if isinstance(section.get(key), str)}
        if top_level:
            _walk_build_info(top_level, f"datasets.{name}", section, raw, problems)
        if isinstance(build_info, dict):
            _walk_build_info(build_info, f"datasets.{name}.build_info", section, raw, problems)
    return problems


def missing_files(cfg, raw: dict | None = None) -> tuple[list[str], list[str]]:
    """(model problems, data problems): every local file the config names that is not there.

    ``raw`` (see :func:`raw_config`) lets a message name the environment variable a key is read from.
    """
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return (_model_file_problems(plain.get("model") or {}, raw), _data_file_problems(plain.get("datasets") or {}, raw))

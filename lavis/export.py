"""``python -m lavis.export --checkpoint CKPT --out DIR --format peft|merged|openflamingo``.

- ``peft``: the LM adapter in peft's format, loadable with ``PeftModel.from_pretrained(plain_llama, DIR)``
  (``base_model_name_or_path`` is the config's ``model.lang_encoder_path``). Beside it, for this
  framework's loaders (``evaluate.py --checkpoint DIR``, ``lavis.predict``, ``load_model_and_preprocess``):
  the model section (``petvlm_model.yaml``) and the trained weights outside the LM adapter, i.e. perceiver
  and cross-attention (``flamingo_trainable.safetensors``).
- ``merged``: a plain Hugging Face model folder (``AutoModelForCausalLM.from_pretrained(DIR)``) with the
  adapter merged into the language model, and the tokenizer.
- ``single``: a sharded (``run.strategy: fsdp``) step checkpoint directory consolidated into one
  checkpoint file, ``DIR/checkpoint.pt`` (full trainable weights and the training state, no optimizer).
- ``openflamingo``: ``DIR/checkpoint.pt`` in the OpenFlamingo release's key layout with the fine-tuned
  perceiver, cross-attention and embeddings (adapters merged), for the OpenFlamingo code's
  ``model.load_state_dict(torch.load(path), strict=False)``.

CKPT is anything ``lavis.models.trained.resolve_checkpoint`` accepts (step_*.pt, a sharded step_*/ directory,
best.pt, a run directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("peft", "merged", "openflamingo", "single")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lavis.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="step_*.pt, best.pt or a run directory")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically if it exists)")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument(
        "--base-model",
        default=None,
        help="peft: base_model_name_or_path to record (default: the config's model.lang_encoder_path)",
    )
    return parser


def export_peft(model, section: dict, out: Path, base_model: str | None = None) -> None:
    """The peft folder plus this framework's sidecar files (see the module docstring)."""
    import os

    import safetensors.torch
    import yaml

    from lavis.models.adapter_export import save_adapter
    from lavis.models.trained import FLAMINGO_TRAINABLE, MODEL_SECTION

    base = base_model or section.get("lang_encoder_path") or os.environ.get("LLAMA_PATH")
    outside_lm = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.trainable_state_dict().items()
        if not name.startswith("lang_encoder.")
    }

    def sidecars(folder: str) -> None:
        Path(folder, MODEL_SECTION).write_text(yaml.safe_dump(section, sort_keys=False))
        if outside_lm:
            safetensors.torch.save_file(outside_lm, str(Path(folder, FLAMINGO_TRAINABLE)))

    save_adapter(model, str(out), base_model_name_or_path=str(base) if base else None, extra=sidecars)


def export_openflamingo(model, out: Path) -> Path:
    """``out/checkpoint.pt`` in the release layout; returns its path."""
    import torch

    from lavis.common.fileio import atomic_directory
    from lavis.models.adapter_export import openflamingo_state_dict

    state = openflamingo_state_dict(model)
    with atomic_directory(out) as tmp:
        torch.save(state, Path(tmp) / "checkpoint.pt")
    return out / "checkpoint.pt"


def export_single(trained, out: Path) -> Path:
    """A sharded step checkpoint consolidated into ``out/checkpoint.pt`` (lavis.runners.sharded_checkpoint)."""
    from lavis.common.errors import ConfigError
    from lavis.runners.sharded_checkpoint import consolidate, is_sharded_checkpoint

    if not is_sharded_checkpoint(trained.path):
        raise ConfigError(
            f"--format single: {trained.path} is already a single-file checkpoint (it consolidates a "
            f"sharded checkpoints/step_*/ directory)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return consolidate(trained.path, out / "checkpoint.pt")


def export(checkpoint: str, out: str, fmt: str, base_model: str | None = None) -> Path:
    """Load ``checkpoint`` and write it to ``out`` in format ``fmt``; returns the main output path."""
    from lavis.common.errors import ConfigError
    from lavis.common.logging import get_logger
    from lavis.models.adapter_export import merge_and_export
    from lavis.models.inference import load_model_and_preprocess
    from lavis.models.trained import resolve_checkpoint

    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    trained = resolve_checkpoint(checkpoint)
    out_path = Path(out).expanduser().resolve()
    if fmt == "single":
        return export_single(trained, out_path)
    model, _, _ = load_model_and_preprocess(checkpoint=checkpoint)
    section = dict(trained.model_cfg or {})
    log = get_logger()
    if fmt == "peft":
        export_peft(model, section, out_path, base_model)
        log.info("peft adapter written to %s (PeftModel.from_pretrained(base_llama, %r))", out_path, str(out_path))
        return out_path
    if fmt == "merged":
        merge_and_export(model, str(out_path))
        if any(not name.startswith("lang_encoder.") for name in model.trainable_state_dict()):
            log.warning(
                "the merged folder is the language model alone; the trained perceiver and cross-attention "
                "are in --format openflamingo (or peft, for this framework)"
            )
        return out_path
    return export_openflamingo(model, out_path)


def main(argv=None) -> None:
    """The CLI (see the module docstring)."""
    from lavis.cli import user_errors
    from lavis.common.logging import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(0)
    with user_errors():
        path = export(args.checkpoint, args.out, args.format, args.base_model)
    print(f"exported ({args.format}): {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""``python -m lavis.predict --checkpoint CKPT --image IMG [IMG ...] [--question Q] [--demos F] [--json]``.

Captions (or, with ``--question``, answers) for one or many images: paths, folders (every image in
them, sorted) or globs. Batched. ``--demos`` is a JSON-lines file of in-context examples shown before
each query, ``{"image": path, "caption": text}`` per line (``{"image", "question", "answer"}`` with
``--question``). Without ``--checkpoint`` the untrained ``--model-type`` is used. The output is one
``path<TAB>text`` line per image, or with ``--json`` one JSON object per line.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lavis.predict", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        help="step_*.pt, best.pt, a run directory, a peft adapter folder or an "
        "OpenFlamingo checkpoint.pt (default: the untrained --model-type)",
    )
    parser.add_argument("--model-type", default=None, help="model type without --checkpoint (e.g. tiny)")
    parser.add_argument("--cfg-path", default=None, help="a project YAML whose model section to use")
    parser.add_argument("--image", nargs="+", required=True, help="image files, folders or globs")
    parser.add_argument("--question", default=None, help="ask this question about every image (VQA)")
    parser.add_argument("--demos", default=None, help="JSON lines of in-context examples (see above)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    return parser


def expand_images(specs: list[str]) -> list[Path]:
    """Image paths of files, folders (their images, sorted) and globs; DataError when one names nothing."""
    from lavis.common.errors import DataError

    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images = [path]
        else:
            images = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not images:
            raise DataError(f"--image {spec}: no image file there")
        found += images
    return found


def read_demos(path: str, vqa: bool) -> list[tuple]:
    """(image, caption) or (image, question, answer) tuples of a JSON-lines file, checked line by line."""
    from lavis.common.errors import DataError
    from lavis.common.fileio import read_json_lines

    fields = ("image", "question", "answer") if vqa else ("image", "caption")
    demos = []
    for number, record in read_json_lines(path, "demonstrations file"):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise DataError(f"{path}:{number}: a demonstration needs {', '.join(fields)}; missing {', '.join(missing)}")
        image = Path(record["image"])
        demos.append((image if image.is_absolute() else Path(path).parent / image, *[record[f] for f in fields[1:]]))
    return demos


def predict(args) -> list[dict]:
    """One record per image: ``{"image", "caption"}`` or ``{"image", "question", "answer"}``."""
    from lavis.models.inference import load_model_and_preprocess

    images = expand_images(args.image)
    demos = read_demos(args.demos, args.question is not None) if args.demos else None
    model_type = args.model_type if (args.model_type or args.checkpoint or args.cfg_path) else "tiny"
    model, _, _ = load_model_and_preprocess(
        model_type=model_type, checkpoint=args.checkpoint, cfg=args.cfg_path, device=args.device
    )
    decoding = {
        k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v is not None
    }
    if args.question is None:
        texts = model.caption(images, demos=demos, batch_size=args.batch_size, **decoding)
        return [{"image": str(p), "caption": t} for p, t in zip(images, texts)]
    texts = model.answer(images, [args.question] * len(images), demos=demos, batch_size=args.batch_size, **decoding)
    return [{"image": str(p), "question": args.question, "answer": t} for p, t in zip(images, texts)]


def main(argv=None) -> None:
    """The CLI (see the module docstring)."""
    from lavis.cli import user_errors

    args = _parser().parse_args(argv)
    # No console logging set up: stdout holds only the predictions (warnings still reach stderr).
    with user_errors():
        records = predict(args)
    for record in records:
        text = record.get("caption", record.get("answer"))
        print(json.dumps(record, ensure_ascii=False) if args.json else f"{record['image']}\t{text}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

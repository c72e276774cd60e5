"""What the two bad-input tables share (test_bad_inputs_config.py: run values, schema, command line;
test_bad_inputs_files.py: output directories, checkpoints, data files, images, results files).

Each case runs through the real entry point's main function in process (train.py's and evaluate.py's
``lavis.cli`` mains, the metric CLIs), and must: exit with code 2, print one message naming the
file / key / sample at fault, print no traceback, and leave every file that existed before untouched
(``assert_refused``). ``build_world`` writes the files the cases point at.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import torch
import yaml
from conftest import TINY_MODEL, shapes_section
from test_checkpoint_integrity import flip_in_place
from test_datasets_builders import write_coco

from lavis.cli import evaluate_main, train_main
from lavis.metrics import caption as caption_cli
from lavis.metrics import vqa as vqa_cli

FIXTURES = Path(__file__).parent / "fixtures"
_RUN = {
    "task": "captioning",
    "device": "cpu",
    "max_epoch": 1,
    "max_steps": 2,
    "batch_size_train": 4,
    "batch_size_eval": 4,
    "num_beams": 1,
    "max_new_tokens": 4,
    "log_freq": 1,
    "progress_bar": False,
    "save_freq_steps": 1,
    "metrics": ["BLEU"],
    "agg_metric": "Bleu_4",
}


def build_world(root: Path, shapes_root: Path) -> dict:
    """Files the cases point at, under ``root``: a config, a finished run with checkpoints, COCO-style data,
    results files (conftest's session fixture ``bad_inputs_world`` builds them once)."""
    out = root / "out"
    cfg = root / "base.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": TINY_MODEL,
                "datasets": {"shapes_caption": shapes_section(shapes_root)},
                "run": {**_RUN, "output_dir": str(out)},
            },
            sort_keys=False,
        )
    )
    train_main(["--cfg-path", str(cfg), "--options", "run.run_name=done"])
    checkpoints = out / "done" / "checkpoints"
    step = checkpoints / "step_00000002.pt"
    bad = root / "ckpt"
    bad.mkdir()
    raw = step.read_bytes()
    (bad / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (bad / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    flipped = bad / "flipped.pt"
    flipped.write_bytes(raw)
    flip_in_place(flipped)
    torch.save({"model": {}, "payload": eval}, bad / "code.pt")
    (bad / "text.pt").write_text("not a checkpoint")
    weights_only = bad / "best_like.pt"
    from lavis.runners.checkpoint import save_checkpoint
    from lavis.runners.train_state import weights_state

    save_checkpoint(weights_only, weights_state({"w": torch.zeros(2)}, {}, 1, {"metric": None}))
    save_checkpoint(bad / "newer.pt", {"format_version": 99, "model": {}})
    save_checkpoint(bad / "other_model.pt", {"format_version": 2, "model": {"not.a.param": torch.zeros(1)}})

    coco = write_coco(root / "coco")
    broken_json = root / "coco_broken.json"
    broken_json.write_text(Path(coco["karpathy_file"]).read_text()[:-5])
    bad_image_root = root / "coco_bad_images"
    shutil.copytree(coco["images"], bad_image_root)
    (bad_image_root / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    results = root / "results"
    results.mkdir()
    vqa_ann, vqa_q = FIXTURES / "vqa_eval" / "annotations.json", FIXTURES / "vqa_eval" / "questions.json"
    answers = [
        {"question_id": a["question_id"], "answer": "yes"} for a in json.loads(vqa_ann.read_text())["annotations"]
    ]
    (results / "vqa_missing.json").write_text(json.dumps(answers[1:]))
    (results / "vqa_extra.json").write_text(json.dumps(answers + [{"question_id": 987654321, "answer": "no"}]))
    (results / "vqa_no_id.json").write_text(json.dumps([{"answer": "yes"}]))
    (results / "broken.json").write_text("[{")
    (results / "not_a_list.json").write_text('{"a": 1}')
    cap_ann = FIXTURES / "caption_eval" / "captions_annotations.json"
    images = [i["id"] for i in json.loads(cap_ann.read_text())["images"]]
    (results / "cap_missing.json").write_text(json.dumps([{"image_id": i, "caption": "a"} for i in images[1:]]))
    (results / "cap_extra.json").write_text(json.dumps([{"image_id": i, "caption": "a"} for i in images + [424242]]))
    a_file = root / "a_file"
    a_file.write_text("x")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("run: {task: captioning\n")
    return {
        "root": root,
        "cfg": cfg,
        "out": out,
        "step": step,
        "best": checkpoints / "best.pt",
        "bad": bad,
        "coco": coco,
        "broken_json": broken_json,
        "bad_image_root": bad_image_root,
        "results": results,
        "vqa_ann": vqa_ann,
        "vqa_q": vqa_q,
        "cap_ann": cap_ann,
        "a_file": a_file,
    }


def train_args(*options):
    """A case's arguments: train.py's (or evaluate.py's) ``--cfg-path`` of the world's config with ``options``."""
    return lambda w: ["--cfg-path", str(w["cfg"]), "--options", *options]


ENTRIES = {"train": train_main, "evaluate": evaluate_main, "vqa": vqa_cli.main, "caption": caption_cli.main}


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def assert_refused(world: dict, entry: str, argv, expected: str, capsys) -> None:
    """``ENTRIES[entry](argv(world))`` exits 2 with an ``error:`` line matching ``expected``, no traceback, and
    no file under the world's root modified, deleted or added."""
    before = snapshot(world["root"])
    args = argv(world)
    capsys.readouterr()
    code = None
    try:
        code = ENTRIES[entry](args)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, f"exit {code!r}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message, err[-3000:]
    assert re.search(expected, err), f"{expected!r} not in:\n{err[-3000:]}"
    after = snapshot(world["root"])
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f"modified or deleted: {changed}"
    added = [str(p) for p in after if p not in before]
    assert not added, f"written although the input was refused: {added}"

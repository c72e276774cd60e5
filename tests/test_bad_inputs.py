"""Every bad input is refused before work starts: a table of (case, entry point, arguments, expected message).

Each case runs through the real entry point's main function in process (train.py's and evaluate.py's
``lavis.cli`` mains, the metric CLIs), and must: exit with code 2, print one message naming the
file / key / sample at fault, print no traceback, and leave every file that existed before untouched.
The cases cover configs, ``--options``, data files, images, checkpoints, output directories and
results files.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, shapes_section
from test_checkpoint_integrity import flip_in_place
from test_datasets_builders import write_coco

from lavis.cli import evaluate_main, train_main
from lavis.metrics import caption as caption_cli
from lavis.metrics import vqa as vqa_cli

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def world(tmp_path_factory, shapes_root) -> dict:
    """Files the cases point at: a config, a finished run with checkpoints, COCO-style data, results files."""
    root = tmp_path_factory.mktemp("bad_inputs")
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
    import shutil

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


def coco_options(w, **build_info) -> list[str]:
    """--options that replace the shapes data by the COCO-style fixture (with ``build_info`` changes)."""
    info = {**w["coco"], **build_info}
    section = {
        "coco_caption": {
            "build_info": info,
            "splits": ["train", "val"],
            "vis_processor": {
                "train": {"name": "clip_image_eval", "image_size": 64},
                "eval": {"name": "clip_image_eval", "image_size": 64},
            },
        }
    }
    return ["datasets=" + json.dumps(section)]


# (case id, entry point, arguments(world), a regex the message must match)
def _train(*options):
    return lambda w: ["--cfg-path", str(w["cfg"]), "--options", *options]


CASES = [
    # --- run values the schema cannot express ---------------------------------------------------------
    ("negative init_lr", "train", _train("run.init_lr=-1e-4"), r"run\.init_lr: must be >= 0"),
    ("negative min_lr", "train", _train("run.min_lr=-1e-5"), r"run\.min_lr: must be >= 0"),
    (
        "min_lr above init_lr",
        "train",
        _train("run.init_lr=1e-4", "run.min_lr=1e-3"),
        r"run\.min_lr: must be <= run\.init_lr",
    ),
    ("negative warmup_lr", "train", _train("run.warmup_lr=-1"), r"run\.warmup_lr: must be >= 0"),
    ("max_epoch 0", "train", _train("run.max_epoch=0"), r"run\.max_epoch: must be >= 1"),
    ("negative max_epoch", "train", _train("run.max_epoch=-2"), r"run\.max_epoch: must be >= 1"),
    ("batch_size_train 0", "train", _train("run.batch_size_train=0"), r"run\.batch_size_train: must be >= 1"),
    ("batch_size_eval 0", "train", _train("run.batch_size_eval=0"), r"run\.batch_size_eval: must be >= 1"),
    ("accum 0", "train", _train("run.accum_grad_iters=0"), r"run\.accum_grad_iters: must be >= 1"),
    ("log_freq 0", "train", _train("run.log_freq=0"), r"run\.log_freq: must be >= 1"),
    ("val_freq 0", "train", _train("run.val_freq=0"), r"run\.val_freq: must be >= 1"),
    ("keep_last 0", "train", _train("run.keep_last=0"), r"run\.keep_last: must be >= 1"),
    ("max_steps 0", "train", _train("run.max_steps=0"), r"run\.max_steps: must be >= 1 or null"),
    ("negative warmup_steps", "train", _train("run.warmup_steps=-3"), r"run\.warmup_steps: must be >= 0"),
    (
        "warmup longer than the run",
        "train",
        _train("run.warmup_steps=500"),
        r"run\.warmup_steps: 500 is longer than the run",
    ),
    (
        "warmup longer than max_iters",
        "train",
        _train("run.runner=runner_iter", "run.max_iters=10", "run.warmup_steps=20"),
        r"run\.warmup_steps: 20 is longer than the run \(run\.max_iters=10\)",
    ),
    ("max_iters 0", "train", _train("run.runner=runner_iter", "run.max_iters=0"), r"run\.max_iters: must be >= 1"),
    ("negative weight_decay", "train", _train("run.weight_decay=-0.1"), r"run\.weight_decay: must be >= 0"),
    ("beta1 above 1", "train", _train("run.beta1=1.5"), r"run\.beta1: must be in \[0, 1\)"),
    ("eps 0", "train", _train("run.eps=0"), r"run\.eps: must be > 0"),
    ("negative max_grad_norm", "train", _train("run.max_grad_norm=-1"), r"run\.max_grad_norm: must be >= 0"),
    ("negative num_workers", "train", _train("run.num_workers=-1"), r"run\.num_workers: must be >= 0"),
    ("negative save_freq_steps", "train", _train("run.save_freq_steps=-1"), r"run\.save_freq_steps: must be >= 0"),
    ("lr_decay_rate 0", "train", _train("run.lr_decay_rate=0"), r"run\.lr_decay_rate: must be > 0"),
    ("dist_timeout_s 0", "train", _train("run.dist_timeout_s=0"), r"run\.dist_timeout_s: must be >= 1"),
    ("num_beams 0", "train", _train("run.num_beams=0"), r"run\.num_beams: must be >= 1"),
    ("max_new_tokens 0", "train", _train("run.max_new_tokens=0"), r"run\.max_new_tokens: must be >= 1"),
    (
        "min_new_tokens above max",
        "train",
        _train("run.min_new_tokens=9"),
        r"run\.min_new_tokens: must be <= run\.max_new_tokens",
    ),
    ("negative train_max_shots", "train", _train("run.train_max_shots=-1"), r"run\.train_max_shots: must be >= 0"),
    ("num_trials 0", "evaluate", _train("run.num_trials=0"), r"run\.num_trials: must be >= 1"),
    ("negative num_shots", "evaluate", _train("run.num_shots=[0,-4]"), r"run\.num_shots: shot counts must be >= 0"),
    (
        "best_metric typo",
        "train",
        _train("run.valid_splits=[val]", "run.best_metric=Bleu4"),
        r"run\.best_metric: 'Bleu4' is not a metric of task 'captioning'; choose one of agg_metrics, Bleu_1",
    ),
    (
        "best_split not validated",
        "train",
        _train("run.valid_splits=[val]", "run.best_split=test"),
        r"run\.best_split: 'test' is not one of run\.valid_splits",
    ),
    (
        "agg_metric not produced",
        "train",
        _train("run.agg_metric=CIDEr"),
        r"run\.agg_metric: 'CIDEr' is not a score of run\.metrics",
    ),
    (
        "several problems reported together",
        "train",
        _train("run.init_lr=-1", "run.num_beams=0", "run.max_epoch=0"),
        r"(?s)base\.yaml: 3 problem\(s\).*run\.init_lr.*run\.max_epoch.*run\.num_beams",
    ),
    # --- schema: names, types, registry ---------------------------------------------------------------
    ("unknown run key", "train", _train("run.init_lrr=1e-4"), r"run\.init_lrr: unknown key\. Did you mean 'init_lr'\?"),
    ("wrong type", "train", _train("run.init_lr=fast"), r"run\.init_lr: expected float, got str 'fast'"),
    ("unknown task", "train", _train("run.task=captionning"), r"run\.task: .*captionning"),
    ("unknown runner", "train", _train("run.runner=runner_epoch"), r"run\.runner: .*runner_epoch"),
    ("unknown lr schedule", "train", _train("run.lr_sched=cosine"), r"run\.lr_sched: .*cosine"),
    ("amp not a choice", "train", _train("run.amp=fp8"), r"run\.amp: 'fp8' is not one of"),
    ("fp16 on the CPU", "train", _train("run.amp=fp16"), r"run\.amp: fp16 mixed precision is only supported on CUDA"),
    (
        "unknown split",
        "train",
        _train("run.valid_splits=[vall]"),
        r"run\.valid_splits: no dataset has the split 'vall'",
    ),
    ("unknown section", "train", _train("runn.seed=1"), r"runn: unknown top-level section \(did you mean 'run'\?\)"),
    ("unknown model type", "train", _train("model.model_type=tiniest"), r"model\.model_type: unknown type 'tiniest'"),
    ("unknown model key", "train", _train("model.lora_rank=4"), r"model\.lora_rank: unknown key"),
    ("unknown builder", "train", _train("datasets.coco_captions={}"), r"datasets\.coco_captions"),
    (
        "unknown dataset key",
        "train",
        _train("datasets.shapes_caption.num_images=3"),
        r"datasets\.shapes_caption\.num_images: unknown key",
    ),
    (
        # Refused when the strategy places the model, which happens before the run directory is made.
        "fsdp over mixed stored dtypes in fp32",
        "train",
        _train("run.strategy=fsdp", "run.amp=fp32", "model.frozen_dtype=bfloat16"),
        r"run\.strategy=fsdp with run\.amp=fp32: the model stores parameters in",
    ),
    (
        "evaluate with no split to evaluate",
        "train",
        _train("run.evaluate=true", "run.valid_splits=[]", "run.test_splits=[]"),
        r"run\.evaluate: true needs run\.test_splits or run\.valid_splits",
    ),
    (
        "unknown processor option, at load time with the run's problems",
        "train",
        _train("datasets.shapes_caption.vis_processor.train.min_scal=0.5", "run.num_beams=0"),
        r"(?s)base\.yaml: 2 problem\(s\).*datasets\.shapes_caption\.vis_processor\.train\.min_scal: unknown key\. "
        r"Did you mean 'min_scale'\?.*run\.num_beams: must be >= 1",
    ),
    (
        "crop scale out of range",
        "train",
        _train("datasets.shapes_caption.vis_processor.train.min_scale=1.5"),
        r"datasets\.shapes_caption\.vis_processor\.train\.min_scale: need 0 < min_scale <= max_scale <= 1",
    ),
    (
        "processor name not a string",
        "train",
        _train("datasets.shapes_caption.vis_processor.train.name=[a,b]"),
        r"datasets\.shapes_caption\.vis_processor\.train\.name: expected a string, got list",
    ),
    (
        "unknown processor",
        "train",
        _train("datasets.shapes_caption.text_processor.eval.name=captiontext"),
        r"datasets\.shapes_caption\.text_processor\.eval\.name: .*captiontext",
    ),
    (
        "loss_reduction not a choice",
        "train",
        _train("run.loss_reduction=mean"),
        r"run\.loss_reduction: 'mean' is not one of",
    ),
    # --- command line ---------------------------------------------------------------------------------
    (
        "options value not YAML",
        "train",
        _train("run.valid_splits=[val"),
        r"--options run\.valid_splits: the value '\[val' is not valid YAML",
    ),
    (
        "options mapping not YAML",
        "train",
        _train("run.wandb={mode: offline"),
        r"--options run\.wandb: the value .* is not valid YAML",
    ),
    ("options without =", "train", _train("run.seed"), r"--options: 'run\.seed' is not of the form key=value"),
    (
        "options empty key part",
        "train",
        _train("run..seed=1"),
        r"--options 'run\.\.seed=1': 'run\.\.seed' is not a dotted key",
    ),
    (
        "cfg-path missing",
        "train",
        lambda w: ["--cfg-path", str(w["root"] / "nope.yaml")],
        r"config file not found: .*nope\.yaml",
    ),
    (
        "cfg-path not YAML",
        "train",
        lambda w: ["--cfg-path", str(w["root"] / "broken.yaml")],
        r"broken\.yaml: not valid YAML",
    ),
    (
        "cfg-path a list",
        "train",
        lambda w: ["--cfg-path", str(w["root"] / "list.yaml")],
        r"list\.yaml: expected a mapping at the top level",
    ),
    ("cfg-path a directory", "train", lambda w: ["--cfg-path", str(w["root"])], r"config file not found"),
    # --- output directories ---------------------------------------------------------------------------
    (
        "run_name exists",
        "train",
        _train("run.run_name=done"),
        r"run\.run_name: .*done already exists and is never overwritten",
    ),
    (
        "output_dir is a file",
        "train",
        lambda w: ["--cfg-path", str(w["cfg"]), "--options", f"run.output_dir={w['a_file']}"],
        r"run\.output_dir: .*a_file exists and is not a directory",
    ),
    (
        "latest without run_name",
        "train",
        _train("run.resume_ckpt_path=latest"),
        r"run\.resume_ckpt_path=latest needs run\.run_name",
    ),
    # --- checkpoints ----------------------------------------------------------------------------------
    (
        "resume path missing",
        "train",
        _train("run.resume_ckpt_path=/nonexistent/step_1.pt"),
        r"run\.resume_ckpt_path: /nonexistent/step_1\.pt does not exist",
    ),
    (
        "resume truncated",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'truncated.pt'}")(w),
        r"truncated\.pt: not a readable checkpoint",
    ),
    (
        "resume random bytes",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'random.pt'}")(w),
        r"random\.pt: not a readable checkpoint",
    ),
    (
        "resume text file",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'text.pt'}")(w),
        r"text\.pt: not a readable checkpoint",
    ),
    (
        "resume flipped bytes",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'flipped.pt'}")(w),
        r"flipped\.pt: corrupt checkpoint",
    ),
    (
        "resume pickled code",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'code.pt'}")(w),
        r"code\.pt: refused: this file carries pickled code \(GLOBAL builtins\.eval\); it was not executed",
    ),
    (
        "resume a newer format",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'newer.pt'}")(w),
        r"newer\.pt: written in checkpoint format 99",
    ),
    (
        "resume from weights only",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['bad'] / 'best_like.pt'}")(w),
        r"best_like\.pt: not a training checkpoint",
    ),
    (
        # Continues the existing run "done": refusing it must leave that run exactly as it was.
        "resume with changed seed",
        "train",
        lambda w: _train(f"run.resume_ckpt_path={w['step']}", "run.seed=5")(w),
        r"step_00000002\.pt: the config differs .*run\.seed: 42 -> 5",
    ),
    (
        "evaluate with weights of another model",
        "train",
        lambda w: _train(
            "run.evaluate=true", "run.valid_splits=[val]", f"run.resume_ckpt_path={w['bad'] / 'other_model.pt'}"
        )(w),
        r"other_model\.pt: trainable state dict does not fit the model: missing",
    ),
    (
        "evaluate.py checkpoint random bytes",
        "evaluate",
        lambda w: ["--cfg-path", str(w["cfg"]), "--checkpoint", str(w["bad"] / "random.pt")],
        r"random\.pt: not a readable checkpoint",
    ),
    (
        "evaluate.py checkpoint missing",
        "evaluate",
        lambda w: ["--cfg-path", str(w["cfg"]), "--checkpoint", str(w["root"] / "gone.pt")],
        r"gone\.pt: no such checkpoint file or directory",
    ),
    # --- data files and images --------------------------------------------------------------------------
    (
        "annotation file missing",
        "train",
        lambda w: _train(*coco_options(w, karpathy_file=str(w["root"] / "missing.json")))(w),
        r"missing\.json",
    ),
    (
        "annotation file not JSON",
        "train",
        lambda w: _train(*coco_options(w, karpathy_file=str(w["broken_json"])))(w),
        r"coco_broken\.json: not valid JSON",
    ),
    (
        "image folder missing",
        "train",
        lambda w: _train(*coco_options(w, images=str(w["root"] / "no_images")))(w),
        r"no_images",
    ),
    (
        "image file missing",
        "train",
        lambda w: _train(*coco_options(w, images=str(w["bad_image_root"])))(w),
        r"(?s)1 image file\(s\) not found.*COCO_train2014_000000000001\.jpg \(image_id=1\)",
    ),
    # --- results files (metric CLIs) ------------------------------------------------------------------
    (
        "vqa results miss ids",
        "vqa",
        lambda w: [
            "--questions",
            str(w["vqa_q"]),
            "--annotations",
            str(w["vqa_ann"]),
            "--results",
            str(w["results"] / "vqa_missing.json"),
        ],
        r"vqa_missing\.json: answers \d+ of the \d+ question_ids .* 1 missing \(first: \[\d+\]\); pass --allow-partial",
    ),
    (
        "vqa results add ids",
        "vqa",
        lambda w: [
            "--annotations",
            str(w["vqa_ann"]),
            "--results",
            str(w["results"] / "vqa_extra.json"),
            "--allow-partial",
        ],
        r"vqa_extra\.json: 1 question_id\(s\) are not in .*\[987654321\]",
    ),
    (
        "vqa results record without id",
        "vqa",
        lambda w: ["--annotations", str(w["vqa_ann"]), "--results", str(w["results"] / "vqa_no_id.json")],
        r"vqa_no_id\.json: record #0 has no 'question_id'",
    ),
    (
        "vqa results not JSON",
        "vqa",
        lambda w: ["--annotations", str(w["vqa_ann"]), "--results", str(w["results"] / "broken.json")],
        r"broken\.json: not valid JSON",
    ),
    (
        "vqa results not a list",
        "vqa",
        lambda w: ["--annotations", str(w["vqa_ann"]), "--results", str(w["results"] / "not_a_list.json")],
        r"not_a_list\.json: expected a JSON list",
    ),
    (
        "vqa annotations missing",
        "vqa",
        lambda w: ["--annotations", str(w["root"] / "none.json"), "--results", str(w["results"] / "vqa_missing.json")],
        r"annotations file not found: .*none\.json",
    ),
    (
        "caption results miss ids",
        "caption",
        lambda w: [
            "--annotations",
            str(w["cap_ann"]),
            "--results",
            str(w["results"] / "cap_missing.json"),
            "--metrics",
            "BLEU",
        ],
        r"cap_missing\.json: answers \d+ of the \d+ image_ids .* 1 missing",
    ),
    (
        "caption results add ids",
        "caption",
        lambda w: [
            "--annotations",
            str(w["cap_ann"]),
            "--results",
            str(w["results"] / "cap_extra.json"),
            "--metrics",
            "BLEU",
        ],
        r"cap_extra\.json: 1 image_id\(s\) are not in .*\[424242\]",
    ),
    (
        "caption results missing file",
        "caption",
        lambda w: ["--annotations", str(w["cap_ann"]), "--results", str(w["root"] / "r.json")],
        r"results file not found: .*r\.json",
    ),
]

ENTRIES = {"train": train_main, "evaluate": evaluate_main, "vqa": vqa_cli.main, "caption": caption_cli.main}


def _snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_the_table_has_at_least_60_cases_across_every_kind_of_input():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("entry", "argv", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_a_message_naming_it_and_changes_nothing(world, entry, argv, expected, capsys):
    before = _snapshot(world["root"])
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
    import re

    assert re.search(expected, err), f"{expected!r} not in:\n{err[-3000:]}"
    after = _snapshot(world["root"])
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f"modified or deleted: {changed}"
    added = [str(p) for p in after if p not in before]
    assert not added, f"written although the input was refused: {added}"

"""Every bad file input is refused before work starts: a table of (case, entry point, arguments, expected message).

The cases cover output directories, checkpoints (resumed by train.py, loaded by evaluate.py), data files and
images, and results files given to the metric CLIs. Each runs through the real entry point's main function in
process and must exit 2 with one message naming the file / sample at fault, no traceback, and no file changed
(bad_inputs_harness.assert_refused). The config and command-line cases: test_bad_inputs_config.py.
"""

from __future__ import annotations

import json

import pytest
from bad_inputs_harness import assert_refused
from bad_inputs_harness import train_args as _train

pytestmark = pytest.mark.slow


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
CASES = [
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


@pytest.mark.parametrize(("entry", "argv", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_a_message_naming_it_and_changes_nothing(
    bad_inputs_world, entry, argv, expected, capsys
):
    assert_refused(bad_inputs_world, entry, argv, expected, capsys)

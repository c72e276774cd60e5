"""Every bad config value, ``--options`` and command line is refused before work starts: a table of
(case, entry point, arguments, expected message).

The cases cover run values the schema cannot express (ranges, relations between keys), the schema (unknown
names, types, registry entries) and the command line (``--options``, ``--cfg-path``). Each runs through the
real entry point's main function in process and must exit 2 with one message naming the key at fault, no
traceback, and no file changed (bad_inputs_harness.assert_refused). The files' cases (output directories,
checkpoints, data, results files): test_bad_inputs_files.py.
"""

from __future__ import annotations

import pytest
from bad_inputs_harness import assert_refused
from bad_inputs_harness import train_args as _train
from test_bad_inputs_files import CASES as FILE_CASES

pytestmark = pytest.mark.slow

# (case id, entry point, arguments(world), a regex the message must match)
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
]


def test_the_table_has_at_least_60_cases_across_every_kind_of_input():
    cases = CASES + FILE_CASES
    assert len(cases) >= 60 and len({case[0] for case in cases}) == len(cases)


@pytest.mark.parametrize(("entry", "argv", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_a_message_naming_it_and_changes_nothing(
    bad_inputs_world, entry, argv, expected, capsys
):
    assert_refused(bad_inputs_world, entry, argv, expected, capsys)

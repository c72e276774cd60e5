"""The shipped OpenFlamingo v2 configs: the eval configs' v2 protocol and the prompts (VQAv2, COCO) and caption
post-processing their tasks build, the train configs' precision, the model types' environment variables named
when their files are missing; model-config relations reported with dotted keys; the v1 added-token head rows
drawn from the config's seed. (The v2 LM families themselves: test_flamingo_v2_families.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lavis.cli import train_main
from lavis.common.errors import ConfigError
from lavis.models import build_model

torch.set_num_threads(1)
V2_PROJECTS = Path("configs/projects/openflamingo_v2")
REF = Path(__file__).parent / "fixtures" / "openflamingo_v2_reference"


@pytest.mark.parametrize("name,task,max_new", [("caption_coco_fewshot", "captioning", 20), ("vqav2_fewshot", "vqa", 5)])
def test_v2_eval_configs_carry_the_v2_protocol(name, task, max_new):
    from lavis.common.config import load_config

    cfg = load_config(V2_PROJECTS / "eval" / f"{name}.yaml")
    run = cfg.run
    assert cfg.model.model_type == "mpt7b_vitl14" and cfg.model.xattn_semantics == "v2"
    assert cfg.model.lang_encoder_env == "MPT7B_PATH" and cfg.model.cross_attn_every_n_layers == 4
    assert (run.task, run.num_beams, run.length_penalty, run.max_new_tokens, run.min_new_tokens) == (
        task,
        3,
        0.0,
        max_new,
        0,
    )
    assert run.num_shots == [0, 4, 8, 16, 32] and len(run.trial_seeds) == run.num_trials == 3
    assert run.zero_shot_text_demos and run.num_samples is None
    if task == "vqa":
        assert run.always_normalize
    assert run.demo_pool_size == 2048 and run.demo_separator == "\n" and run.demo_method == "random"


def _two_shot_prompt(name: str, demos: list[dict], query: dict) -> str:
    """The eval prompt the shipped v2 config's task builds for one query with these two demonstrations."""
    from types import SimpleNamespace

    from lavis.common.config import load_config
    from lavis.common.registry import registry
    from lavis.models.flamingo.tokenizer import load_tokenizer

    cfg = load_config(V2_PROJECTS / "eval" / f"{name}.yaml")
    task = registry.get("task", cfg.run.task).setup_task(cfg)
    model = SimpleNamespace(tokenizer=load_tokenizer(str(REF / "mpt" / "lm")))
    image = torch.zeros(3, 32, 32)
    item = {**query, "image": image, "demos": [{**d, "image": image} for d in demos]}
    return task.collator(model, "eval")([item])["prompt"][0]


def test_v2_vqav2_config_builds_the_reference_prompt():
    # The reference fixture's vqa_fewshot prompt is v2's VQA prompt with two demonstrations.
    expected = json.loads((REF / "mpt" / "cases" / "vqa_fewshot" / "case.json").read_text())["prompts"][0]
    demos = [
        # answer differs from answers[0]: v2 shows answers[0]
        {"text_input": "What color is the bus?", "answer": "blue", "answers": ["red", "blue", "blue"]},
        {"text_input": "How many dogs are there?", "answer": "two", "answers": ["2", "two", "two"]},
    ]
    demos = [{**d, "question_id": i, "image_id": i} for i, d in enumerate(demos)]
    query = {"text_input": "What is the cat doing?", "question_id": 9, "image_id": 9}
    assert _two_shot_prompt("vqav2_fewshot", demos, query) == expected


def test_v2_coco_config_builds_the_v2_caption_prompt_and_postprocessing():
    from lavis.common.config import load_config
    from lavis.common.registry import registry

    demos = [{"text_input": "A red bus.", "image_id": 1}, {"text_input": "Two dogs.", "image_id": 2}]
    prompt = _two_shot_prompt("caption_coco_fewshot", demos, {"image_id": 9})
    assert prompt == "<image>Output:A red bus.<|endofchunk|>\n<image>Output:Two dogs.<|endofchunk|>\n<image>Output:"
    cfg = load_config(V2_PROJECTS / "eval" / "caption_coco_fewshot.yaml")
    task = registry.get("task", "captioning").setup_task(cfg)
    # v2's clean-up: cut at "Output", drop quotes, no strip
    (record,) = task.records({"image_id": [9]}, [' A "cat" on a mat. Output: more'])
    assert record["caption"] == " A cat on a mat. "


@pytest.mark.parametrize(
    "name,amp,frozen",
    [("caption_coco_mpt7b_lora_4xv100", "fp16", "float16"), ("caption_coco_mpt7b_lora_1xa100", "bf16", "bfloat16")],
)
def test_v2_train_configs(name, amp, frozen):
    from lavis.common.config import load_config

    cfg = load_config(V2_PROJECTS / "train" / f"{name}.yaml")
    assert (cfg.run.amp, cfg.model.frozen_dtype) == (amp, frozen)
    assert cfg.model.adapters.method == "lora" and cfg.model.adapters.target_modules is None


def test_model_config_relations_are_reported_with_dotted_keys(tmp_path):
    from lavis.common.config import load_config

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "model:\n  arch: openflamingo\n  model_type: tiny_mpt\n  cross_attn_every_n_layers: 0\n"
        "  tiny: {lm_heads: 5, image_size: 60, vision_head_width: 24}\n  perceiver: {heads: 0}\n"
        "datasets:\n  shapes_caption: {}\nrun:\n  task: captioning\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    message = str(err.value)
    for expected in (
        "model.tiny.lm_heads: 5 does not divide model.tiny.lm_hidden_size 128",
        "model.tiny.patch_size: 16 does not divide model.tiny.image_size 60",
        "model.tiny.vision_head_width: 24 does not divide model.tiny.vision_width 64",
        "model.cross_attn_every_n_layers: must be >= 1",
        "model.perceiver.heads: must be positive",
    ):
        assert expected in message


def test_v2_config_without_its_files_names_the_model_types_variables(tmp_path, monkeypatch, capsys):
    for variable in ("MPT7B_PATH", "LLAMA_PATH", "OPENFLAMINGO_V2_CHECKPOINT", "CLIP_VITL14_WEIGHTS", "PETVLM_DATA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train_main(
            [
                "--cfg-path",
                str(Path(__file__).parent.parent / V2_PROJECTS / "train" / "caption_coco_mpt7b_lora_4xv100.yaml"),
            ]
        )
    lines = [x.strip() for x in capsys.readouterr().err.splitlines() if x.strip().startswith("- model.")]
    expected = {
        "model.tokenizer_path": "MPT7B_PATH",
        "model.lang_encoder_path": "MPT7B_PATH",
        "model.pretrained_checkpoint_path": "OPENFLAMINGO_V2_CHECKPOINT",
        "model.clip_vision_encoder_pretrained": "CLIP_VITL14_WEIGHTS",
    }
    for key, variable in expected.items():
        (line,) = [x for x in lines if x.startswith(f"- {key}:")]
        assert variable in line and "LLAMA_PATH" not in line, line


def test_v1_added_token_head_rows_come_from_the_config_not_the_process_rng():
    # The v1 checkpoint does not carry lm_head, so its added-token rows (<|endofchunk|> decides where
    # generation stops) are drawn; they depend on model.embedding_init_seed only.
    ref = Path(__file__).parent / "fixtures" / "openflamingo_reference"
    cfg = {
        "arch": "openflamingo",
        "clip_vision_encoder_path": str(ref / "vision" / "ViT-Dev-P16.json"),
        "clip_vision_encoder_pretrained": str(ref / "vision" / "ViT-Dev-P16.pt"),
        "lang_encoder_path": str(ref / "llama"),
        "tokenizer_path": str(ref / "llama"),
        "cross_attn_every_n_layers": 1,
        "pretrained_checkpoint_path": str(ref / "checkpoint.pt"),
        "xattn_semantics": "v1",
        "adapters": {"method": None},
    }
    heads = []
    for seed, init_seed in ((0, 0), (99, 0), (0, 1)):
        torch.manual_seed(seed)
        heads.append(build_model({**cfg, "embedding_init_seed": init_seed}).lang_encoder.lm_head.weight[640:])
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])

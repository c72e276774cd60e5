"""AdamW parameter groups and the registered lr schedules (values at chosen steps, lr_scale)."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from toy_components import ToyModel, make_cfg

from lavis.common.errors import ConfigError
from lavis.runners.optim import build_lr_schedule, build_optimizer, build_param_groups


def run_cfg(tmp_path, **kw):
    return make_cfg(tmp_path, **kw).run


def names_by_group(model, cfg):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {
        g["name"]: (sorted(ids[id(p)] for p in g["params"]), g["weight_decay"], g["lr_scale"])
        for g in build_param_groups(model, cfg)
    }


def test_default_policy_no_decay_on_bias_norm_gate_embed_and_frozen_left_out(tmp_path):
    groups = names_by_group(ToyModel(), run_cfg(tmp_path, weight_decay=0.1))
    assert groups["default_decay"] == (["head.weight", "proj.weight"], 0.1, 1.0)
    assert groups["default_no_decay"] == (
        ["attn_gate", "embed_scale", "head.bias", "norm.bias", "norm.weight", "proj.bias"],
        0.0,
        1.0,
    )
    all_names = [n for names, _, _ in groups.values() for n in names]
    assert not any(n.startswith("backbone") for n in all_names)


def test_param_group_rules_first_match_wins_and_override_decay(tmp_path):
    cfg = run_cfg(
        tmp_path,
        weight_decay=0.1,
        param_groups=[
            {"match": r"^proj\.", "lr_scale": 0.5, "weight_decay": None},
            {"match": "gate|proj", "lr_scale": 2.0, "weight_decay": 0.3},
        ],
    )
    groups = names_by_group(ToyModel(), cfg)
    assert groups["rule0_decay"] == (["proj.weight"], 0.1, 0.5)
    assert groups["rule0_no_decay"] == (["proj.bias"], 0.0, 0.5)
    assert groups["rule1"] == (["attn_gate"], 0.3, 2.0)


def test_param_group_rule_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"run.param_groups\[0\].match: 'nothing_like_this' matches no"):
        build_param_groups(ToyModel(), run_cfg(tmp_path, param_groups=[{"match": "nothing_like_this"}]))
    with pytest.raises(ConfigError, match=r"run.param_groups\[0\].match: invalid regular expression"):
        build_param_groups(ToyModel(), run_cfg(tmp_path, param_groups=[{"match": "(unclosed"}]))


def schedule(tmp_path, total=100, per_epoch=10, **kw):
    cfg = run_cfg(tmp_path, init_lr=1.0, min_lr=0.1, warmup_lr=0.0, warmup_steps=10, **kw)
    cfg.param_groups = [{"match": "head", "lr_scale": 0.25, "weight_decay": None}]
    opt = build_optimizer(ToyModel(), cfg)
    return opt, build_lr_schedule(opt, cfg, total, per_epoch)


def test_linear_warmup_cosine_values(tmp_path):
    _, s = schedule(tmp_path, lr_sched="linear_warmup_cosine_lr")
    assert s.base_lr(0) == 0.0
    assert s.base_lr(5) == pytest.approx(0.5)
    assert s.base_lr(10) == pytest.approx(1.0)
    # Steps run 0..99: the cosine spans the 89 steps from 10 to the last step, 99.
    span = 100 - 1 - 10
    assert s.base_lr(40) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 30 / span)))
    # Half way through the cosine: the mean of init and min.
    assert s.base_lr(10 + span / 2) == pytest.approx(0.55)
    # The last step reaches min_lr exactly, and the lr stays there.
    assert s.base_lr(99) == pytest.approx(0.1, abs=1e-12)
    assert s.base_lr(98) > 0.1
    assert s.base_lr(100) == pytest.approx(0.1, abs=1e-12)
    # Stepped per iteration, not per epoch: two steps of one epoch differ.
    assert s.base_lr(21) != s.base_lr(22)


def test_linear_warmup_step_values(tmp_path):
    _, s = schedule(tmp_path, lr_sched="linear_warmup_step_lr", lr_decay_rate=0.5, lr_decay_steps=20)
    assert [s.base_lr(i) for i in (0, 5, 10, 29, 30, 50, 70)] == pytest.approx([0, 0.5, 1, 1, 0.5, 0.25, 0.125])
    assert s.base_lr(150) == pytest.approx(0.1)  # floored at min_lr
    _, per_epoch = schedule(tmp_path, lr_sched="linear_warmup_step_lr", lr_decay_rate=0.5)
    # Default: one decay per epoch (10 steps) after warmup.
    assert [per_epoch.base_lr(19), per_epoch.base_lr(20)] == pytest.approx([1.0, 0.5])


def test_constant_values(tmp_path):
    _, s = schedule(tmp_path, lr_sched="constant_lr")
    assert [s.base_lr(i) for i in (0, 4, 10, 99)] == pytest.approx([0, 0.4, 1, 1])


@pytest.mark.parametrize("name", ["linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr"])
def test_every_schedule_honours_lr_scale(tmp_path, name):
    opt, s = schedule(tmp_path, lr_sched=name)
    for step in (3, 10, 47):
        base = s.step(step)
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(base * (0.25 if group["name"].startswith("rule0") else 1.0))
    assert {g["lr_scale"] for g in opt.param_groups} == {0.25, 1.0}


def test_schedule_state_round_trip_restores_lrs(tmp_path):
    opt, s = schedule(tmp_path)
    s.step(42)
    opt2, s2 = schedule(tmp_path)
    s2.load_state_dict(s.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_unknown_schedule_lists_known_names(tmp_path):
    cfg = run_cfg(tmp_path, lr_sched="cosine")
    opt = build_optimizer(ToyModel(), cfg)
    with pytest.raises(ConfigError, match="run.lr_sched: unknown lr_scheduler 'cosine'.*linear_warmup_cosine_lr"):
        build_lr_schedule(opt, cfg, 10, 5)


def test_adamw_settings(tmp_path):
    opt = build_optimizer(ToyModel(), run_cfg(tmp_path, beta2=0.98, eps=1e-6, init_lr=3e-4))
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in opt.param_groups)
    assert OmegaConf.is_config(run_cfg(tmp_path))

"""Config loading: every shipped YAML validates; each kind of bad config gives its intended message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lavis.common.config import CONFIG_ROOT, load_config
from lavis.common.errors import ConfigError
from lavis.common.registry import registry
from lavis.common.schema import check_mapping

REPO = Path(__file__).resolve().parent.parent
PROJECT_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """
model:
  arch: openflamingo
  model_type: tiny
datasets:
  shapes_caption: {}
run:
  task: captioning
"""


def test_the_tree_has_configs():
    assert len(PROJECT_CONFIGS) >= 6
    assert len(list(CONFIG_ROOT.rglob("*.yaml"))) >= 6


@pytest.mark.parametrize("path", PROJECT_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_project_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.run.task in registry.names("task")
    assert cfg.model.arch in registry.names("model")
    assert set(cfg.datasets) <= set(registry.names("builder"))


@pytest.mark.parametrize("path", sorted(CONFIG_ROOT.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_every_default_config_validates_against_its_schema(path):
    data = yaml.safe_load(path.read_text())
    if path.parent.parent.name == "models":
        section = data["model"]
        assert (section["arch"], section["model_type"]) == (path.parent.name, path.stem)
        schema, extra = registry.get("model", section["arch"]).Config, ("arch", "model_type")
    else:
        assert path.parent.parent.name == "datasets" and list(data["datasets"]) == [path.parent.name]
        section = data["datasets"][path.parent.name]
        schema, extra = registry.get("builder", path.parent.name).Config, ()
    # Interpolations (e.g. the data root) are strings here; their type is checked after resolution.
    _, errors = check_mapping(section, schema, "x", extra_allowed=extra)
    assert errors == []


def test_defaults_are_merged_under_the_project(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["run.init_lr=3e-4", "run.valid_splits=[val]"])
    assert cfg.model.xattn_semantics == "v2"  # from lavis/configs/models/openflamingo/tiny.yaml
    assert cfg.datasets.shapes_caption.on_bad_sample == "error"  # from the builder's defaults.yaml
    assert cfg.run.init_lr == 3e-4 and list(cfg.run.valid_splits) == ["val"]
    assert cfg.run.num_beams == 3  # the task's own default


def test_overriding_model_type_selects_another_default_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["model.model_type=llama7b_vitl14"])
    assert cfg.model.model_type == "llama7b_vitl14"
    assert cfg.model.cross_attn_every_n_layers == 4
    assert cfg.model.xattn_semantics == "v1"
    assert cfg.model.clip_vision_encoder_path == "ViT-L-14"


def test_all_problems_are_reported_together_with_paths_and_hints(tmp_path):
    path = write(tmp_path, MINIMAL + "  init_lrr: 1.0e-4\n  max_epoch: two\n  lr_sched: linear_warmup_cosine\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.perceiver.depht=2"])
    text = str(err.value)
    assert "run.init_lrr: unknown key. Did you mean 'init_lr'?" in text
    assert "run.max_epoch: expected int, got str 'two'" in text
    assert "run.lr_sched: unknown lr_scheduler 'linear_warmup_cosine'. Did you mean 'linear_warmup_cosine_lr'?" in text
    assert "model.perceiver.depht: unknown key. Did you mean 'depth'?" in text
    assert "4 problem(s)" in text


def test_values_that_used_to_fail_late_fail_at_load_time_together_naming_each_key(tmp_path):
    # Each of these used to pass the loader and fail later: in the schedule, at the first evaluation, at the
    # first generation, at the first batch (an image the tiny ViT cannot take), or when the model was built.
    path = write(tmp_path, MINIMAL + "  valid_splits: [val]\n")
    bad = [
        "run.min_lr=-1e-5",
        "run.best_metric=Bleu4",
        "run.num_beams=0",
        "datasets.shapes_caption.vis_processor.eval.image_size=224",
        "model.tiny.lm_heads=3",
        "model.adapters.method=lora",
        "model.adapters.r=0",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(path, bad)
    text = str(err.value)
    expected = [
        "run.min_lr: must be >= 0, got -1e-05",
        "run.best_metric: 'Bleu4' is not a metric of task 'captioning'",
        "run.num_beams: must be >= 1, got 0",
        "datasets.shapes_caption.vis_processor.eval.image_size: 224, but the model's vision tower takes 64 x 64",
        "model.tiny.lm_heads: 3 does not divide model.tiny.lm_hidden_size 128",
        "model.adapters.r: must be positive, got 0",
    ]
    missing = [line for line in expected if line not in text]
    assert not missing, f"not reported: {missing}\nmessage:\n{text}"
    assert f"{len(expected)} problem(s)" in text


def test_the_model_receives_its_config_instance(tmp_path):
    from omegaconf import OmegaConf

    from lavis.models.flamingo.openflamingo import OpenFlamingo

    cfg = load_config(write(tmp_path, MINIMAL), ["model.adapters.method=lora"])
    instance = OmegaConf.to_object(cfg.model)
    assert isinstance(instance, OpenFlamingo.Config) and instance.adapters.method == "lora"
    assert instance.tiny.image_size == 64 and instance.arch == "openflamingo"


def test_a_builder_and_its_processors_receive_their_config_instances(tmp_path, monkeypatch):
    from lavis.datasets import processors
    from lavis.datasets.builders.shapes import ShapesCaptionBuilder

    cfg = load_config(write(tmp_path, MINIMAL), ["datasets.shapes_caption.vis_processor.train.min_scale=0.8"])
    builder = ShapesCaptionBuilder(cfg.datasets.shapes_caption)
    assert isinstance(builder.cfg, ShapesCaptionBuilder.Config)
    received = []
    monkeypatch.setattr(processors.ClipImageTrainProcessor, "__init__", lambda self, c: received.append(c))
    builder.processors("train")
    assert isinstance(received[0], processors.ClipImageTrainProcessor.Config) and received[0].min_scale == 0.8


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        (
            "arch: openflamingo",
            "arch: openflamingoo",
            "model.arch: unknown model 'openflamingoo'. Did you mean 'openflamingo'?",
        ),
        (
            "model_type: tiny",
            "model_type: tinny",
            "model.model_type: unknown type 'tinny' for arch 'openflamingo'. Did you mean 'tiny'?",
        ),
        (
            "shapes_caption: {}",
            "shapes_captions: {}",
            "datasets.shapes_captions: unknown builder 'shapes_captions'. Did you mean 'shapes_caption'?",
        ),
        ("task: captioning", "task: captoning", "run.task: unknown task 'captoning'. Did you mean 'captioning'?"),
    ],
)
def test_unknown_registry_names_list_the_nearest(tmp_path, replace, by, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL.replace(replace, by)))
    assert expected in str(err.value)
    assert "Known" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"--options: 'run.init_lr' is not of the form key=value"):
        load_config(write(tmp_path, MINIMAL), ["run.init_lr"])
    with pytest.raises(ConfigError, match=r"modle: unknown top-level section \(did you mean 'model'\?\)"):
        load_config(write(tmp_path, MINIMAL + "modle: {}\n"))


def test_a_user_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, MINIMAL.replace("task: captioning", "task: captoning"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg-path", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "unknown task 'captoning'" in proc.stderr

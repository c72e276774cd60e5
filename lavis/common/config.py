"""Load, merge and validate a project config.

Order of precedence, lowest first:
  1. the model's default YAML ``lavis/configs/models/<arch>/<model_type>.yaml``,
  2. each dataset builder's default YAML ``lavis/configs/datasets/<builder>/defaults.yaml``,
  3. the project YAML given with ``--cfg-path``,
  4. ``--options key=value ...`` (dotted keys, values parsed as YAML).
``model.arch`` and ``model.model_type`` are read after step 4, so an override of
``model.model_type`` selects a different default YAML. The merged config is then
checked against the schemas of the named components; every problem is reported
in one ConfigError.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lavis.common.errors import ConfigError
from lavis.common.registry import nearest, registry
from lavis.common.schema import check_mapping, config_instance, instantiate, merged_schema, well_typed

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = ("model", "datasets", "run")
DEFAULT_RUNNER = "runner_base"


def model_default_path(arch: str, model_type: str) -> Path:
    """Where the default YAML of a model type lives."""
    return CONFIG_ROOT / "models" / arch / f"{model_type}.yaml"


def dataset_default_path(builder: str) -> Path:
    """Where the default YAML of a dataset builder lives."""
    return CONFIG_ROOT / "datasets" / builder / "defaults.yaml"


def read_yaml(path: str | Path) -> DictConfig:
    """Read a YAML file into a DictConfig; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    return cfg


def parse_options(options: list[str] | None) -> DictConfig:
    """``["run.init_lr=1e-4", "run.valid_splits=[val]"]`` -> a DictConfig (values parsed as YAML)."""
    options = list(options or [])
    for option in options:
        if "=" not in option or option.startswith("="):
            raise ConfigError(f"--options: {option!r} is not of the form key=value")
    problems = []
    for option in options:
        key, _, value = option.partition("=")
        if not key.strip() or any(not part for part in key.split(".")):
            problems.append(f"--options {option!r}: {key!r} is not a dotted key (e.g. run.init_lr)")
            continue
        try:
            OmegaConf.from_dotlist([option])
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(
                f"--options {key}: the value {value!r} is not valid YAML ({first}); quote a string "
                f"value, e.g. {key}='\"...\"'"
            )
    if problems:
        raise ConfigError("; ".join(problems))
    return OmegaConf.from_dotlist(options)


def _model_defaults(model: DictConfig, source: str) -> DictConfig:
    arch = model.get("arch")
    model_type = model.get("model_type")
    if not arch or not model_type:
        missing = [k for k in ("arch", "model_type") if not model.get(k)]
        raise ConfigError(f"{source}: model.{' and model.'.join(missing)} must be set")
    registry.get("model", arch, key_path="model.arch")
    path = model_default_path(arch, model_type)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        hint = nearest(model_type, known)
        hint = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"model.model_type: unknown type {model_type!r} for arch {arch!r}.{hint} Known types: {', '.join(known)}"
        )
    return read_yaml(path)


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> DictConfig:
    """The validated, defaults-filled config of a run (see the module docstring for the merge order)."""
    return validate(merge_config(cfg_path, options), source=str(cfg_path))


def merge_config(cfg_path: str | Path, options: list[str] | None = None) -> DictConfig:
    """The merged config before validation, its interpolations (e.g. ``${oc.env:...}``) unresolved."""
    project = read_yaml(cfg_path)
    overrides = parse_options(options)
    unknown = [k for k in list(project.keys()) + list(overrides.keys()) if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            "; ".join(
                f"{key}: unknown top-level section (did you mean {nearest(key, SECTIONS)!r}?)"
                if nearest(key, SECTIONS)
                else f"{key}: unknown top-level section; sections are {', '.join(SECTIONS)}"
                for key in dict.fromkeys(unknown)
            )
            + f" (in {cfg_path} or --options)"
        )
    user = OmegaConf.merge(project, overrides)
    layers = [_model_defaults(user.get("model") or OmegaConf.create(), str(cfg_path))]
    for name in (user.get("datasets") or {}).keys():
        registry.get("builder", name, key_path=f"datasets.{name}")
        path = dataset_default_path(name)
        if path.is_file():
            layers.append(read_yaml(path))
    return OmegaConf.merge(*layers, user)


def validate(cfg: DictConfig, source: str = "config") -> DictConfig:
    """Check every section against its components' schemas; all problems are raised together."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: cannot resolve an interpolation: {err}") from None
    errors: list[str] = []
    out: dict = {}

    model = plain.get("model") or {}
    model_cls = _lookup("model", model.get("arch"), "model.arch", errors)
    model_config = None
    if model_cls is not None:
        out["model"], errs = check_mapping(model, model_cls.Config, "model")
        errors += errs
        model_config = instantiate(model_cls.Config, out["model"]) if well_typed(errs) else None

    out["datasets"], dataset_configs = {}, {}
    for name, section in (plain.get("datasets") or {}).items():
        builder_cls = _lookup("builder", name, f"datasets.{name}", errors)
        if builder_cls is not None:
            out["datasets"][name], errs = check_mapping(section, builder_cls.Config, f"datasets.{name}")
            errors += errs
            if well_typed(errs):
                dataset_configs[name] = instantiate(builder_cls.Config, out["datasets"][name])
    if model_config is not None:
        errors += _image_size_problems(model_config.input_image_size(), out["datasets"])

    run = plain.get("run") or {}
    task_cls = _lookup("task", run.get("task"), "run.task", errors)
    # The run section holds the runner's keys (its registered class's Config) and the task's; an unknown
    # runner is reported, and the section is still checked against the default runner's keys.
    runner_name = run.get("runner", DEFAULT_RUNNER)
    runner_cls = _lookup("runner", runner_name, "run.runner", errors) if isinstance(runner_name, str) else None
    runner_cls = runner_cls or registry.get("runner", DEFAULT_RUNNER)
    run_schema = run_section_schema(runner_cls.Config, task_cls.Config if task_cls is not None else None)
    # Types first, then the runner's and the task's range and cross-key checks (RunConfig.validate and the
    # task Config's), all reported with the other errors.
    out["run"], errs = check_mapping(run, run_schema, "run")
    errors += errs
    if isinstance(out["run"], dict) and isinstance(out["run"].get("lr_sched"), str):
        # A name, like run.task and run.runner: reported even when other values have the wrong type.
        _lookup("lr_scheduler", out["run"]["lr_sched"], "run.lr_sched", errors)
    run_config = instantiate(run_schema, out["run"]) if well_typed(errs) else None

    if errors:
        listing = "\n  - ".join(dict.fromkeys(errors))
        raise ConfigError(f"{source}: {len(errors)} problem(s) in the config:\n  - {listing}")
    cfg = OmegaConf.create(out)
    # The model section is a structured node of its Config: build_model hands the class its instance
    # (OmegaConf.to_object), and a later assignment (evaluate --checkpoint) is type-checked.
    cfg.model = OmegaConf.structured(model_config)
    # Likewise the run section: the runner and the task take its instance (schema.config_instance of it).
    cfg.run = OmegaConf.structured(run_config)
    # And each dataset section: its builder takes the instance of its builder's Config.
    for name, dataset_config in dataset_configs.items():
        cfg.datasets[name] = OmegaConf.structured(dataset_config)
    return cfg


def run_section_schema(runner_config: type, task_config: type | None) -> type:
    """The class of the run section: the runner's keys and the task's, flat (the same class on every call)."""
    return merged_schema("RunSection", runner_config, *([task_config] if task_config is not None else []))


def run_section(run, task_config: type, runner_config: type | None = None):
    """The run section as its typed instance, for the task and the runner that receive it.

    The loader's section (a structured node of this class) is taken as it is; a section built in code
    (a dict or DictConfig, e.g. in tests) is validated here by the same checks (``schema.config_instance``).
    ``runner_config`` defaults to the Config of the runner ``run.runner`` names.
    """
    if runner_config is None:
        name = run.runner if dataclasses.is_dataclass(run) else (run or {}).get("runner", DEFAULT_RUNNER)
        runner_config = registry.get("runner", name, key_path="run.runner").Config
    return config_instance(run_section_schema(runner_config, task_config), run, "run")


def _image_size_problems(size: int | None, datasets: dict) -> list[str]:
    """Each dataset image transform whose output side is not ``size``, the side the vision tower takes."""
    if size is None:
        return []
    problems = []
    for name, section in datasets.items():
        for role, processor in (section.get("vis_processor") or {}).items():
            given = processor.get("image_size") if isinstance(processor, dict) else None
            if isinstance(given, int) and given != size:
                problems.append(
                    f"datasets.{name}.vis_processor.{role}.image_size: {given}, but the model's vision tower "
                    f"takes {size} x {size} images"
                )
    return problems


def _lookup(kind: str, name, key_path: str, errors: list[str]):
    if not name:
        errors.append(f"{key_path}: required key is missing")
        return None
    try:
        return registry.get(kind, name, key_path=key_path)
    except ConfigError as err:
        errors.append(str(err))
        return None


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what is printed at start-up and saved as config.yaml)."""
    return OmegaConf.to_yaml(cfg, resolve=True)

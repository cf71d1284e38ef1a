"""The composed Hydra config as plain, checked dataclasses: with the entry point, the only reader of the app's
DictConfig. Everything below takes what this module builds."""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from .config_types import check_fields, check_numeric_kwargs, is_number, shown
from .shell import DEFAULT_TRACKING_URI
from .errors import ConfigError, one_line
from .metrics import metric_directions, metric_names

if TYPE_CHECKING:
    from .train import RunSpec


@dataclass(frozen=True)
class Recording:
    """Where and how a run is recorded in MLflow (the `mlflow` section)."""

    tracking_uri: str  # a SQLite store (DEFAULT_TRACKING_URI), or a tracking server's http(s) URL
    experiment: str  # the MLflow experiment that holds the runs
    run_name: str | None = None  # null: MLflow picks one (a sweep names its trials trial-<n>)
    registered_model: str | None = None  # a sweep registers its best model under this name


# `${metric_directions:${optimized_metric}}` gives hydra.sweeper.direction the directions of optimized_metric
OmegaConf.register_resolver("metric_directions", metric_directions, replace=True)
OmegaConf.register_resolver("metric_names", metric_names, replace=True)


def source_tree() -> Path | None:
    """The checkout this code runs from (PYTHONPATH, `python -m` in the repo, an editable install); None when it
    runs from an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file() else None


SOURCE = source_tree()
# A checkout reads its own conf/, so edits apply at once even when another copy is installed; an installed wheel
# reads the copy it ships as the package mnist_sweep.conf.
CONFIG_PATH = str(SOURCE / "conf") if SOURCE else "pkg://mnist_sweep.conf"
# outputs/configs (where sweeps write <study>_best experiments) is on Hydra's search path before it exists: every
# composition (the CLI, the bench, replay) would warn about it until the first sweep writes there
warnings.filterwarnings("ignore", message=r".*path=outputs/configs is not available")
TRUSTED_TARGETS = ("torch.optim.*",)  # what the optimizer's and scheduler's _target_ may name (pruners: the sweeper plugin's _trial.py)


def _section(cfg: DictConfig, key: str, cls: type) -> Any:
    """cfg[key] as the dataclass `cls`; an unknown or mistyped key names itself."""
    values = OmegaConf.to_container(cfg[key], resolve=True)
    check_fields(cls, values, key)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{key}: {e}") from None


def _factory(node: DictConfig | None, key: str):
    """A `_target_` node -> (callable building the object, interval); (None, 'epoch') when there is none."""
    if node is None or node.get("_target_") is None:
        return None, "epoch"
    kwargs = OmegaConf.to_container(node, resolve=True)
    interval = kwargs.pop("interval", "epoch")
    try:
        partial = hydra.utils.instantiate(kwargs, _execution_whitelist_=TRUSTED_TARGETS)
    except Exception as e:
        raise ConfigError(f"{key}._target_={node._target_!r} could not be built: {e}") from None
    if isinstance(partial, functools.partial):
        check_numeric_kwargs(partial.func, kwargs, key)
    lr = kwargs.get("lr")
    if key == "optimizer" and is_number(lr) and not lr > 0:  # torch takes lr=0 and trains nothing
        raise ConfigError(f"optimizer.lr={lr} must be > 0: it scales every update")
    if key == "scheduler":
        wants_steps = "steps_per_epoch" in kwargs
        return (lambda opt, steps: partial(opt, steps_per_epoch=steps) if wants_steps else partial(opt)), interval
    return partial, interval


# The run config's top-level keys (conf/config.yaml and its groups); Hydra adds `+key=value` anywhere without asking
TOP_LEVEL_KEYS = ("model", "optimizer", "scheduler", "data", "trainer", "optimized_metric", "mlflow", "storage")


def build_spec(cfg: DictConfig) -> RunSpec:
    """The composed config as plain, validated dataclasses; raises ConfigError naming the bad key."""
    # here, not at the top: torch comes with them, and a sweep's main process, which composes but never trains,
    # starts its workers sooner without it
    from .data import DataConfig
    from .model import ModelConfig
    from .train import RunSpec, TrainerConfig

    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}={shown(cfg.get(unknown[0]))} is not a setting of mnist_sweep (a `+key=...` "
                          f"adds any key, and nothing would read it); the top-level keys are "
                          f"{', '.join(TOP_LEVEL_KEYS)}: see `python -m mnist_sweep --cfg job`")

    metrics = tuple(metric_names(cfg.optimized_metric))
    make_optimizer, _ = _factory(cfg.optimizer, "optimizer")
    make_scheduler, interval = _factory(cfg.get("scheduler"), "scheduler")
    return RunSpec(
        model=_section(cfg, "model", ModelConfig),
        data=_section(cfg, "data", DataConfig),
        trainer=_section(cfg, "trainer", TrainerConfig),
        make_optimizer=make_optimizer,
        make_scheduler=make_scheduler,
        scheduler_interval=interval,
        optimized_metric=metrics,
    )


def build_recording(cfg: DictConfig) -> Recording:
    """The mlflow section, checked before any MLflow call (an empty experiment name would fail only once the run
    is being created)."""
    mlflow = cfg.mlflow
    for name, example in (("tracking_uri", DEFAULT_TRACKING_URI), ("experiment", "mnist_sweep")):
        value = mlflow.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"mlflow.{name}={shown(value)} must be a non-empty string, e.g. "
                              f"mlflow.{name}={example}")
    return Recording(mlflow.tracking_uri, mlflow.experiment, mlflow.get("run_name"), mlflow.get("registered_model"))


def logged_spec(config_yaml: str, data_root: str | None = None) -> tuple[RunSpec, dict[str, Any]]:
    """A run's logged config.yaml (the resolved config it trained) -> (RunSpec, the config as plain values), as
    build_spec builds them from a composed config; `data_root` replaces data.root (where MNIST is on this machine).
    ConfigError when the text is not such a config."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.create(config_yaml)
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"it holds a {type(cfg).__name__}, not the mapping of a run's config")
        if data_root is not None:
            cfg.data.root = data_root
        return build_spec(cfg), OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(one_line(e)) from None


def compose_spec(overrides: list[str]) -> RunSpec:
    """The RunSpec that `python -m mnist_sweep OVERRIDES` would train, for entry points that are not Hydra apps."""
    from hydra import compose, initialize
    from hydra.errors import HydraException

    # One run needs no sweeper: with the basic one and no search space, composing never loads the Optuna plugin's
    # settings, so this works where only torch, Hydra and OmegaConf are installed (the bench on a GPU machine).
    no_sweep = ["hydra/sweeper=basic", "hparams_search=none"]
    try:
        with initialize(config_path=CONFIG_PATH):
            cfg = compose("config", overrides=[*no_sweep, *overrides])
    except HydraException as e:  # its first line, as compose_sweep: Hydra adds the search path and more lines
        raise ConfigError(f"overrides {' '.join(overrides)}: {one_line(e, typed=False)}") from None
    return build_spec(cfg)




@dataclass(frozen=True)
class SweepDefaults:
    """What `python -m mnist_sweep --multirun` runs with a search space, as the sweep benchmark reads it."""

    params: dict[str, str]  # hydra.sweeper.params as override text, e.g. {'model.dropout': 'interval(0.1, 0.6)'}
    n_jobs: int  # hydra.sweeper.n_jobs: trials that run at once
    max_failure_rate: float  # hydra.sweeper.max_failure_rate
    experiment: str  # mlflow.experiment: where the runs of a sweep are
    optimized_metric: tuple[str, ...]
    sampler: dict[str, Any] = field(default_factory=dict)  # hydra.sweeper.sampler, resolved: its _target_ and kwargs
    pruner: dict[str, Any] = field(default_factory=dict)  # hydra.sweeper.pruner, resolved; {} when there is none


SWEEP_EXPRESSION = re.compile(r"(choice|range|interval|tag|glob|shuffle|sort)\(.*\)", re.DOTALL)


def override_text(value: Any) -> str:
    """A config value as the right-hand side of a command-line override: a sweep expression as written, true,
    null, a number, a plain word, or a quoted string."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = str(value)
    if isinstance(value, str) and not (SWEEP_EXPRESSION.fullmatch(text) or re.fullmatch(r"[\w./:@+-]+", text)):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}


def compose_sweep(overrides: list[str], space: str = "default") -> SweepDefaults:
    """The search space and sweep settings that `python -m mnist_sweep --multirun hparams_search=SPACE OVERRIDES`
    would use, read from the composed config (Hydra's part included)."""
    from hydra import compose, initialize
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize(config_path=CONFIG_PATH):
            cfg = compose("config", overrides=[f"hparams_search={space}", *overrides], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.get("params") else {}
        settings = SweepDefaults({k: override_text(v) for k, v in params.items()}, sweeper.n_jobs,
                                 sweeper.max_failure_rate, cfg.mlflow.experiment,
                                 tuple(metric_names(cfg.optimized_metric)), _plain(sweeper.get("sampler")),
                                 _plain(sweeper.get("pruner")))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"overrides {' '.join(overrides)}: {one_line(e, typed=False)}") from None
    if not settings.params:
        raise ConfigError(f"hparams_search={space} has no search space (hydra.sweeper.params is empty)")
    return settings

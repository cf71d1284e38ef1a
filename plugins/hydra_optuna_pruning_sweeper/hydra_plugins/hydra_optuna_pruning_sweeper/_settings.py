"""The sweeper's settings (`hydra.sweeper.*`), checked once when a sweep starts, into one Settings object: every
other module reads this object, never Hydra's config. The sampler and the study it samples for are built here,
since a resumed study and a local worker need the same sampler, seeded by the trials the study already holds."""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import optuna
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from . import _study as studies
from ._errors import ConfigError, one_line, unresolved
from ._space import check_grid_size, grid_choices, sweep_space
from ._trial import build_pruner

SAMPLER_TARGETS = ("optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*")  # upstream's configs too
UNLIMITED = 2**31 - 1  # n_trials when only hydra.sweeper.timeout ends the sweep


@dataclass(frozen=True)
class Settings:
    """What one sweep was asked to do, checked (check_settings builds it)."""

    sampler: dict[str, Any]  # the sampler's config, resolved: built per study by seeded_sampler()
    pruner: str  # JSON of the pruner's _target_ and arguments, as the jobs get it ({}: never prune)
    directions: list[str]
    storage: str | None  # the Optuna storage URL; None: a SQLite file in the sweep folder, new each invocation
    study_name: str | None
    n_trials: int | None  # None: the timeout alone ends the sweep
    timeout: float | None  # seconds
    n_jobs: int
    max_failure_rate: float
    heartbeat_interval: int | None
    grace_period: int | None
    storage_wait: float  # seconds (see config.py); 0: no waiting
    params: Mapping[str, Any] | None
    custom_search_space: str | None
    total_budget: bool
    space_name: str | None
    metric_names: list[str] | None
    tracking_uri: str | None  # None: no MLflow records
    experiment: str | None
    local_workers: bool
    best_config_dir: str | None
    best_config_exclude: tuple[str, ...]
    on_best: Any

    @property
    def objective_names(self) -> list[str]:
        return self.metric_names or ["value"] * len(self.directions)

    @property
    def metric(self) -> str:
        """The first objective's name, as the trial lines and the summary print it."""
        return (self.metric_names or ["value"])[0]

    @property
    def pruner_name(self) -> str:
        return json.loads(self.pruner).get("_target_") or "none"

    def search_space(self, arguments: list[str], warn: bool = True) -> tuple[dict, list[str]]:
        """The distributions to sample and the fixed overrides of every trial (see _space.sweep_space)."""
        return sweep_space(self.params, arguments, warn)

    def seeded_sampler(self, existing: int, distributions: dict) -> tuple[optuna.samplers.BaseSampler, int | None]:
        """The sampler, its seed offset by the trials already in the study so a resumed study draws new points;
        GridSampler gets its grid from the space (and the grid's size caps the budget) and keeps its seed."""
        cfg = copy.deepcopy(self.sampler)  # the seed changes per call
        seed = cfg.get("seed")
        if seed is not None:
            cfg["seed"] = studies.reseeded(seed, existing)
        try:
            sampler = instantiate(cfg, _execution_whitelist_=SAMPLER_TARGETS)
        except Exception as e:
            raise ConfigError(f"hydra.sweeper.sampler: {cfg.get('_target_')!r} could not be built: "
                              f"{one_line(e)}") from None
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            size = check_grid_size(distributions)
            grid = {k: grid_choices(k, d) for k, d in distributions.items()}
            # The seed shuffles the grid, and the study knows a point by its place in that order: every worker
            # and every resume must keep the user's seed, or they run some points twice and others never
            return sampler.func(grid, **(sampler.keywords | {"seed": seed})), size
        return sampler, None

    def open_study(self, storage, name: str | None, distributions: dict, fresh: bool = False
                   ) -> tuple[optuna.Study, int | None]:
        """The study with its seeded sampler, and the grid's size with a grid sampler; `fresh`: a new study even
        where one of that name exists (studies.open_study)."""
        sampler, grid_size = self.seeded_sampler(0, distributions)
        study = studies.open_study(storage, name, self.directions, sampler, fresh=fresh)
        if existing := len(study.get_trials(deepcopy=False)):
            study.sampler, _ = self.seeded_sampler(existing, distributions)
        return study, grid_size


def check_settings(*, sampler: Any = None, pruner: Any = None, direction: Any = "minimize", storage: Any = None,
                   study_name: str | None = None, n_trials: Any = 20, timeout: Any = None, n_jobs: Any = 2,
                   max_failure_rate: Any = 0.0, params: Any = None, custom_search_space: str | None = None,
                   total_budget: bool = False, space_name: str | None = None, heartbeat_interval: Any = None,
                   grace_period: Any = None, storage_wait: Any = 120, metric_names: Any = None,
                   mlflow: Any = None, local_workers: bool = False, best_config_dir: str | None = None,
                   best_config_exclude: Any = (), on_best: Any = None) -> Settings:
    """The sweeper's settings as Hydra gives them (config.OptunaPruningSweeperConf), checked: each bad one is one
    line naming it, its value and what is allowed. Called when the sweep starts, where such a line is printed;
    raised while Hydra builds the sweeper it would be Hydra's traceback."""
    timeout = _checked_budget(n_trials, timeout)
    _check_counts(n_trials=(n_trials, timeout is not None), n_jobs=(n_jobs, False),
                  heartbeat_interval=(heartbeat_interval, True), grace_period=(grace_period, True))
    rate = max_failure_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"hydra.sweeper.max_failure_rate={rate!r} must be a number in [0, 1] (the share of "
                          "the study's trials that may fail before the sweep stops)")
    if isinstance(storage_wait, bool) or not isinstance(storage_wait, (int, float)) or \
            not 0 <= storage_wait < math.inf:
        raise ConfigError(f"hydra.sweeper.storage_wait={storage_wait!r} must be a number of seconds >= 0 (how "
                          "long a running sweep waits for a storage that stopped answering; 0: stop at once)")
    if heartbeat_interval and not grace_period:
        grace_period = 3 * heartbeat_interval
    if study_name is not None:
        studies.check_study_name(study_name)
    tracking_uri, experiment = _checked_mlflow(_plain(mlflow) or {})
    pruner_spec = json.dumps(_plain(pruner) or {})
    build_pruner(pruner_spec)  # a bad pruner is this line now, not the first trial's failure
    return Settings(
        sampler=_plain(sampler) or {}, pruner=pruner_spec, directions=_checked_directions(direction),
        storage=storage, study_name=study_name, n_trials=n_trials, timeout=timeout, n_jobs=n_jobs,
        max_failure_rate=float(rate), heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        storage_wait=float(storage_wait), params=_plain(params), custom_search_space=custom_search_space,
        total_budget=bool(total_budget), space_name=space_name,
        metric_names=list(metric_names) if metric_names else None, tracking_uri=tracking_uri, experiment=experiment,
        local_workers=bool(local_workers), best_config_dir=best_config_dir,
        best_config_exclude=tuple(best_config_exclude or ()), on_best=on_best)


def _plain(value: Any) -> Any:
    """A DictConfig (as Hydra passes nested settings) as plain containers, interpolations resolved; one that does
    not resolve (an unset ${oc.env:VAR}) is a ConfigError naming its key."""
    if not OmegaConf.is_config(value):
        return value
    try:
        return OmegaConf.to_container(value, resolve=True)
    except InterpolationResolutionError as e:
        raise unresolved(e) from None


def _checked_budget(n_trials: Any, timeout: Any) -> float | None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise ConfigError(f"hydra.sweeper.timeout={timeout!r} must be a number of seconds > 0, or null (no limit)")
    if n_trials is None and timeout is None:
        raise ConfigError("hydra.sweeper.n_trials=null needs hydra.sweeper.timeout (seconds): with neither, the "
                          "sweep would never end")
    return None if timeout is None else float(timeout)


def _check_counts(**values: tuple[Any, bool]) -> None:
    """Each setting is (value, whether null is allowed): an integer >= 1."""
    for key, (value, optional) in values.items():
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"hydra.sweeper.{key}={value!r} must be an integer >= 1")


def _checked_directions(direction: Any) -> list[str]:
    directions = [direction] if isinstance(direction, str) else list(direction)
    directions = [getattr(d, "name", d).lower() for d in directions]
    if not directions or any(d not in ("minimize", "maximize") for d in directions):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: each direction must be minimize or maximize")
    return directions


def _checked_mlflow(mlflow: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(tracking URI, experiment); the experiment is checked only where MLflow records are on."""
    uri = mlflow.get("tracking_uri")
    if not uri:
        return None, None
    experiment = mlflow.get("experiment")
    if not isinstance(experiment, str) or not experiment.strip():  # before any run or trial is made
        raise ConfigError(f"hydra.sweeper.mlflow.experiment={experiment!r} must be a non-empty name")
    return str(uri), experiment

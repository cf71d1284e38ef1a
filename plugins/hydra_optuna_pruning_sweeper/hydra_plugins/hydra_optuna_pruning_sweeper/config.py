"""The settings of `hydra/sweeper=optuna_pruning` and its `hydra/sweeper/pruner` options, registered in Hydra's
ConfigStore when Hydra scans its plugins. Only Hydra and OmegaConf here: this module and the facade in
optuna_pruning_sweeper.py are all that a Hydra app imports until a sweep with this sweeper starts."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "hydra-optuna-pruning-sweeper"  # who registered the configs (hydra --info)


@dataclass
class MLflowSettings:
    tracking_uri: Optional[str] = None  # null: no MLflow records
    experiment: str = "Default"  # the experiment that holds the study's parent and trial runs


@dataclass
class OptunaPruningSweeperConf:
    _target_: str = "hydra_plugins.hydra_optuna_pruning_sweeper.optuna_pruning_sweeper.OptunaPruningSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    # upstream's settings, with upstream's defaults
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random|grid|cmaes|nsgaii|nsgaiii|gp|qmc
    direction: Any = "minimize"  # minimize | maximize | a list of them
    storage: Any = None  # null: a SQLite file in the sweep folder, a new study each invocation (<name>-2... there)
    study_name: Optional[str] = None  # null: derived from space_name and the space, else Optuna's random name
    n_trials: Any = 20  # trials of this invocation (of the whole study with total_budget); null: only timeout ends it
    # seconds of sweeping (of the whole study with total_budget, resumed where it stopped); at the deadline no trial
    # starts and running ones stop at their next report (PRUNED, with the reason); null: no time limit
    timeout: Any = None
    n_jobs: Any = 2  # trials launched together (with local_workers: trials running at once)
    max_failure_rate: Any = 0.0  # stop once more than this share of n_trials has failed
    params: Optional[dict[str, Any]] = None  # the search space: {key: sweep expression}
    custom_search_space: Optional[str] = None  # dotpath of fn(cfg, trial) that suggests more params
    # extras, off by default
    pruner: Any = MISSING  # hydra/sweeper/pruner=none|median|hyperband|successive_halving
    total_budget: bool = False  # n_trials counts the study's trials across invocations: rerun = resume
    space_name: Optional[str] = None  # with study_name null: name the study <space_name>-<hash of the space>
    heartbeat_interval: Any = None  # seconds; fail (and re-run once) trials whose process died
    grace_period: Any = None  # seconds without a heartbeat before a trial counts as dead
    # seconds a running sweep waits for its storage when the connection is lost (a database restart), retrying
    # with backoff; then it stops, and the same command resumes. 0: stop at once. Opening it waits only for a
    # database that is restarting or full (max_connections), up to 60 s: a wrong URL fails at once
    storage_wait: Any = 120
    metric_names: Optional[list[str]] = None  # names of the objectives (optuna-dashboard's axes, MLflow)
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    # n_jobs > 1 with Hydra's basic launcher: n_jobs worker processes, each taking the next trial as its own ends
    # (no batch barrier), cores // n_jobs threads each; false: batches of n_jobs through the launcher (upstream's)
    local_workers: bool = False
    best_config_dir: Optional[str] = None  # write the best trial to <dir>/experiment/<study>_best.yaml
    best_config_exclude: list[str] = field(default_factory=list)  # keys and groups kept out of that config
    on_best: Any = None  # a _target_ called with run_id= (the best trial's MLflow run) when the sweep ends


PRUNERS = {  # hydra/sweeper/pruner options: Optuna's pruners with Optuna's defaults
    "none": {"_target_": None},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0,
               "interval_steps": 1, "n_min_trials": 1},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "max_resource": "auto",
                  "reduction_factor": 3},
    "successive_halving": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": "auto",
                           "reduction_factor": 4, "min_early_stopping_rate": 0},
}


# -- hydra/sweeper/sampler options: Optuna's samplers, with Optuna's defaults (the same names and settings as the
# upstream hydra-optuna-sweeper's, so its configs and docs apply; installed beside it, either registration serves)

@dataclass
class TPESamplerConfig:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None  # the sampler's random seed; on resume it is offset by the trials so far
    consider_prior: Optional[bool] = None
    prior_weight: Optional[float] = None
    consider_magic_clip: Optional[bool] = None
    consider_endpoints: Optional[bool] = None
    n_startup_trials: int = 10  # random trials before TPE models the results
    n_ei_candidates: int = 24  # candidates scored per suggestion
    multivariate: bool = False  # model the parameters jointly
    group: bool = False  # with multivariate: split the space into groups seen together
    warn_independent_sampling: Optional[bool] = None
    constant_liar: bool = False  # parallel workers avoid each other's running points
    constraints_func: Any = None


@dataclass
class RandomSamplerConfig:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None  # the sampler's random seed


@dataclass
class GridSamplerConfig:
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True  # the grid comes from the search space when the sweep starts
    seed: Optional[int] = None  # shuffles the order of the grid's points (kept on resume)


@dataclass
class CmaEsSamplerConfig:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None  # the sampler's random seed
    x0: Optional[dict[str, Any]] = None  # the initial mean: {param: value}
    sigma0: Optional[float] = None  # the initial step size
    n_startup_trials: int = 1  # trials from independent_sampler before CMA-ES starts
    independent_sampler: Any = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Any = None
    popsize: Optional[int] = None
    inc_popsize: int = -1
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False
    source_trials: Any = None


@dataclass
class NSGAIISamplerConfig:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Optional[int] = None  # the sampler's random seed
    population_size: int = 50  # trials per generation
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any = None


@dataclass
class NSGAIIISamplerConfig(NSGAIISamplerConfig):
    _target_: str = "optuna.samplers.NSGAIIISampler"
    reference_points: Any = None
    dividing_parameter: int = 3


@dataclass
class GPSamplerConfig:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None  # the sampler's random seed
    independent_sampler: Any = None
    n_startup_trials: int = 10  # random trials before the Gaussian process models the results
    deterministic_objective: bool = False
    constraints_func: Any = None
    warn_independent_sampling: bool = True


@dataclass
class QMCSamplerConfig:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None  # the sampler's random seed
    qmc_type: str = "sobol"  # sobol | halton | lhs
    scramble: bool = False
    independent_sampler: Any = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


SAMPLERS = {"tpe": TPESamplerConfig, "random": RandomSamplerConfig, "grid": GridSamplerConfig,
            "cmaes": CmaEsSamplerConfig, "nsgaii": NSGAIISamplerConfig, "nsgaiii": NSGAIIISamplerConfig,
            "gp": GPSamplerConfig, "qmc": QMCSamplerConfig}


def register_configs() -> None:
    """The plugin's config group, found by any app that installs this package (no conf/ of its own needed)."""
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="optuna_pruning", node=OptunaPruningSweeperConf,
                provider=PROVIDER)
    for name, node in PRUNERS.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)
    # Upstream's hydra-optuna-sweeper registers the same sampler group (the same names and settings) when Hydra
    # scans it; registering both would be a collision (a warning in Hydra 1.4, an error in 1.5), so these are
    # registered only where upstream is not installed. find_spec locates it without importing it.
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        for name, node in SAMPLERS.items():
            store.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)


register_configs()

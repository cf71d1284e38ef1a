"""What the sweep benchmark's peers (`python -m mnist_sweep.peers`) take from our default study, and what a peer's
trial is: the same search space, sampler and pruner settings read from the composed config, and a trial trained by
the library's own calls (compose_spec, prepare, fit, evaluate) with no Hydra run and no MLflow around it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError
from .sweepbench import METRIC, override_keys, space_overrides, trial_threads

TPE = "optuna.samplers.TPESampler"
ASHA, MEDIAN_STOPPING, FIFO = "ASHAScheduler", "MedianStoppingRule", "FIFOScheduler"  # Ray Tune's schedulers
EPOCHS_ATTR = "training_iteration"  # Ray Tune's count of step() calls: a trial's epochs, the schedulers' resource


@dataclass(frozen=True)
class PeerPlan:
    distributions: dict[str, Any]  # the space's sweeps as Optuna distributions
    fixed: tuple[str, ...]  # overrides every trial gets: the space's fixed values, threads, the user's app overrides
    n_jobs: int  # trials at once, as ours runs them
    seed: int  # the sampler's seed
    n_startup_trials: int  # TPE's random trials, as ours
    pruner: dict[str, Any]  # ours' hydra.sweeper.pruner: _target_ and kwargs
    epochs: int  # trainer.epochs of every trial: the pruner's max resource


def make_plan(user: Sequence[str], seed: int, cores: int) -> PeerPlan:
    """The plan for `python -m mnist_sweep --multirun USER` as ours would run it; ConfigError on bad overrides."""
    from .config import compose_spec, compose_sweep
    from hydra_plugins.hydra_optuna_pruning_sweeper import space_from_overrides

    space = compose_sweep(list(user))
    if space.optimized_metric != (METRIC,):
        raise ConfigError(f"optimized_metric={','.join(space.optimized_metric)}: the peers optimize {METRIC}")
    if space.sampler.get("_target_") != TPE:
        raise ConfigError(f"hydra.sweeper.sampler._target_={space.sampler.get('_target_')}: the peers run TPE "
                          "with ours' settings; leave hydra/sweeper/sampler at tpe")
    distributions, fixed, _ = space_from_overrides(space_overrides(space.params, override_keys(user)))
    # hydra.* and hydra/* configure Hydra's sweeper and launcher, which a peer has none of; compose_sweep saw them
    app = [o for o in user if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    base = (*(f"{k}={v}" for k, v in fixed.items()), *trial_threads(user, space.n_jobs, cores), *app)
    spec = compose_spec(list(base))  # every trial shares these: a bad one is found here, before any trial starts
    return PeerPlan(distributions, base, space.n_jobs, seed, space.sampler.get("n_startup_trials") or 0,
                    space.pruner, spec.trainer.epochs)


def trial_overrides(plan: PeerPlan, params: dict[str, Any]) -> list[str]:
    from .config import override_text

    return [*(f"{k}={override_text(v)}" for k, v in params.items()), *plan.fixed]


def prepare_trial(plan: PeerPlan, params: dict[str, Any]):
    """The trial built as a run of the CLI builds it, nothing trained yet."""
    from .config import compose_spec
    from .train import prepare

    return prepare(compose_spec(trial_overrides(plan, params)))


def final_test_acc(prepared) -> float:
    """test/acc once the trial has trained, as a run of the CLI measures it at its end."""
    from .train import evaluate

    return evaluate(prepared, prepared.splits.test)[0]["acc"]


def tpe_sampler(plan: PeerPlan, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.n_startup_trials)


def optuna_pruner(plan: PeerPlan):
    from hydra_plugins.hydra_optuna_pruning_sweeper import build_pruner

    return build_pruner(json.dumps(plan.pruner))


def ray_scheduler(pruner: dict[str, Any], max_t: int) -> tuple[str, dict[str, Any]]:
    """Ours' Optuna pruner as the nearest Ray Tune scheduler, (class name, kwargs), epochs as the resource:
    - SuccessiveHalvingPruner -> ASHA with the same rungs: grace_period = min_resource x reduction_factor **
      min_early_stopping_rate, the same reduction_factor; min_resource "auto" (Optuna: from the first trial's
      steps) is 1 epoch;
    - HyperbandPruner -> ASHA of one bracket from its min_resource and reduction_factor (Ray's HyperBand is
      synchronous; Optuna's brackets are successive halving with other start rungs);
    - MedianPruner -> MedianStoppingRule: n_warmup_steps epochs never judged, n_startup_trials trials first;
    - none (NopPruner) -> FIFO: no early stopping."""
    kind = str(pruner.get("_target_") or "").rsplit(".", 1)[-1]
    if kind in ("", "NopPruner"):
        return FIFO, {}
    if kind == "MedianPruner":
        return MEDIAN_STOPPING, {"time_attr": EPOCHS_ATTR, "grace_period": pruner.get("n_warmup_steps", 0),
                                 "min_samples_required": max(1, pruner.get("n_startup_trials", 5))}
    if kind not in ("SuccessiveHalvingPruner", "HyperbandPruner"):
        raise ConfigError(f"hydra.sweeper.pruner._target_={pruner['_target_']}: no Ray Tune scheduler is mapped "
                          "to it; use successive_halving, hyperband, median or none")
    min_resource = pruner.get("min_resource", "auto")
    grace = 1 if min_resource == "auto" else int(min_resource)
    rate = pruner.get("min_early_stopping_rate", 0) if kind == "SuccessiveHalvingPruner" else 0
    factor = pruner.get("reduction_factor", 4 if kind == "SuccessiveHalvingPruner" else 3)
    return ASHA, {"time_attr": EPOCHS_ATTR, "max_t": max_t, "grace_period": grace * factor ** rate,
                  "reduction_factor": factor, "brackets": 1}

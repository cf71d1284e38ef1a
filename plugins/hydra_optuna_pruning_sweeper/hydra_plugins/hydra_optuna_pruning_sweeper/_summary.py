"""What the sweeper tells a person: a trial's start and end lines, the line of a study whose budget is spent,
and the end of an invocation (optimization_results.yaml, the best trial, the best config, the trials by state)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from . import _results as results, _study as studies
from ._names import FAIL_REASON_ATTR, OVERRIDES_ATTR
from ._settings import UNLIMITED, Settings
from ._space import quote_value, recipe

log = logging.getLogger("optuna_pruning")
SIGNIFICANT_DIGITS = 4  # floats in the trial lines printed to the user


def budget_text(n_trials: int) -> str:
    """n_trials as a person reads it: 'no limit' when only the timeout ends the sweep."""
    return "no limit" if n_trials >= UNLIMITED else str(n_trials)


def trial_params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.{SIGNIFICANT_DIGITS}g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items())


def trial_end_line(study: optuna.Study, trials: Sequence[FrozenTrial], number: int, n_trials: int,
                   metric_names: list[str] | None) -> str:
    """'trial 3 (4/12) COMPLETE val/acc 0.9871 (best so far #1: 0.9890)', 'PRUNED at step 2 ...', 'FAIL: why'
    (a step is what the job reports at: an epoch for mnist_sweep); `trials`: a read of the study after the tell."""
    names = metric_names or ["value"] * len(study.directions)
    trial = next(t for t in trials if t.number == number)
    done = sum(1 for t in studies.counted(trials) if t.state.is_finished())
    head = f"trial {number} ({done}/{budget_text(n_trials)}) {trial.state.name}"
    if trial.state == TrialState.FAIL:
        return f"{head}: {trial.user_attrs.get(FAIL_REASON_ATTR, 'no reason recorded')}"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        head += f" at step {step} {names[0]} {trial.intermediate_values[step]:.4f}"
    elif trial.values:
        head += " " + " ".join(f"{n} {v:.4f}" for n, v in zip(names, trial.values))
    best = results.best_trials(study, trials) if len(study.directions) == 1 else []
    if len(best) == 1:
        head += f" (best so far #{best[0].number}: {best[0].value:.4f})"
    return head


def budget_spent(study: optuna.Study, settings: Settings, n_trials: int, spent: float, sweep_dir: Path) -> bool:
    """A finished study's command says so in one line, and leaves nothing behind (no run, no folder).
    Dead processes' trials have just been failed, so their retries count as room."""
    trials = study.get_trials(deepcopy=False)
    tally = studies.tally(trials)
    used = tally.used
    timeout = settings.timeout
    out_of_time = timeout is not None and spent >= timeout
    if (used < n_trials and not out_of_time) or tally.running:
        return False
    best = results.best_trials(study, trials)
    found = f"; best trial #{best[0].number}: {settings.metric}={best[0].value:.4f}" if len(best) == 1 else ""
    if out_of_time:
        log.info(f"study {study.study_name!r} has used its time budget ({spent:.0f} s of hydra.sweeper.timeout="
                 f"{timeout:g}; {used} trials){found}. To run more, raise it: hydra.sweeper.timeout="
                 f"{timeout + max(60, timeout // 2):g} (the total, not the additional seconds)")
    else:
        log.info(f"study {study.study_name!r} has used its budget ({used}/{n_trials} trials){found}. To run "
                 f"more, raise it: hydra.sweeper.n_trials={n_trials + max(1, n_trials // 2)} (the total, not "
                 "the additional trials)")
    try:
        sweep_dir.rmdir()  # made by Hydra's output-folder check; only if empty
    except OSError:
        pass
    return True


def summarize(study: optuna.Study, settings: Settings, sweep_dir: Path, groups: set[str], tracker) -> None:
    """The end of an invocation: the results file, the best trial (and its config), the trials by state, and
    the same on the study's MLflow run. `groups`: the app's config groups (for the best config)."""
    summary = results.results_summary(study)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
    best = results.best_trials(study)
    if len(best) == 1 and len(study.directions) == 1:
        log.info(f"best trial {best[0].number}: {settings.metric}={best[0].value:.4f} "
                 f"{trial_params_text(best[0].params)}")
        if settings.best_config_dir:
            write_best_config(best[0], study.study_name, settings, groups)
    elif best:
        log.info(f"Pareto front: {len(best)} trials: " + "; ".join(f"#{t.number} {t.values}" for t in best))
    counts = studies.state_counts(study)
    log.info(f"trials by state: {', '.join(f'{k} {v}' for k, v in counts.items() if v)}")
    tracker.record_summary(study, summary, counts, best)


def write_best_config(trial, name: str, settings: Settings, groups: set[str]) -> None:
    """<best_config_dir>/experiment/<study>_best.yaml, and the command that re-runs it."""
    choices, values = recipe(trial.user_attrs.get(OVERRIDES_ATTR, []), groups, settings.best_config_exclude)
    folder = Path(settings.best_config_dir) / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_best.yaml"
    path.write_text(results.experiment_yaml(choices, values,
                                            f"best trial {trial.number} of study {name}: {trial.value}"))
    app = Path(sys.argv[0]).name
    plain = [f"{k}={v}" for k, v in choices.items()] + [f"{k}={quote_value(v)}" for k, v in values.items()]
    log.info(f"best config written to {path}; re-run it with:\n    {app} experiment={shlex.quote(name + '_best')}"
             f"\n    (or: {app} {' '.join(shlex.quote(o) for o in plain)})")

"""Readers of what a sweep recorded, shared by the report, predict and the sweep benchmark: the Optuna study (by
name, or the latest) and a run's per-step metric history in MLflow. No torch here."""

from __future__ import annotations

from typing import Sequence

import optuna

import hydra_plugins.hydra_optuna_pruning_sweeper as sweeper

from .errors import UserError


def latest_study(storage) -> str:
    """The name of the study whose trials started last (a study without trials counts as oldest)."""
    import datetime

    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if not summaries:
        raise UserError("the Optuna storage holds no study yet: run a sweep first (python -m mnist_sweep "
                        "--multirun) or pass --storage")
    oldest = datetime.datetime.min
    return max(summaries, key=lambda s: s.datetime_start or oldest).study_name


def open_existing_study(storage_url: str, name: str | None) -> optuna.Study:
    """Load a study; a missing SQLite file or study name is a UserError that says what exists."""
    database = sweeper.sqlite_file(storage_url)
    if database is not None and not database.is_file():
        raise UserError(f"--storage {storage_url}: no such SQLite file (run a sweep here first, or point "
                        "--storage at its outputs/optuna.db)")
    storage = sweeper.make_storage(storage_url)
    name = name or latest_study(storage)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise UserError(f"--study {name!r} is not in {storage_url}; its studies: {', '.join(names)}") from None


def metric_histories(client, run_id: str, keys: Sequence[str]) -> dict[str, dict[int, "mlflow.entities.Metric"]]:
    """{metric: {step: Metric}} of one run, for each of `keys` (empty where the run never logged it)."""
    return {key: {m.step: m for m in client.get_metric_history(run_id, key)} for key in keys}

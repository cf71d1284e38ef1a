"""Every place the sweeper reaches past `optuna.Study` into Optuna's storage layer, in one module.

Optuna's public API has no way to claim trials under a lock, to keep a heartbeat for trials run through ask/tell,
or to report to a trial from another process; these few calls do it. They are public methods of Optuna's storage
classes (documented for storage implementers, not for end users), plus the calls Optuna marks experimental
(stale trials and their retries) or discourages (the Trial constructor). `RELIED_ON` lists them, and tests/test_optuna_adapter.py fails when an installed Optuna version
changes one of them, instead of a sweep failing halfway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

if TYPE_CHECKING:
    import sqlalchemy

# (object, attribute, parameters it must accept): what this module calls, checked by the adapter's test
RELIED_ON = (
    (RDBStorage, "engine", None),  # the SQLAlchemy engine: the claim lock (PostgreSQL advisory lock) uses it
    (RDBStorage, "get_heartbeat_interval", ()),
    (RDBStorage, "record_heartbeat", ("trial_id",)),
    (RDBStorage, "get_study_id_from_name", ("study_name",)),
    (RDBStorage, "get_trial_id_from_study_id_trial_number", ("study_id", "trial_number")),
    (RDBStorage, "set_trial_user_attr", ("trial_id", "key", "value")),
    (optuna.storages, "fail_stale_trials", ("study",)),  # experimental since Optuna 2.9
    (RetryHeartbeatStaleTrialCallback, "__init__", ("max_retry",)),  # experimental since Optuna 2.8
    (RetryHeartbeatStaleTrialCallback, "__call__", ("study", "trial")),
    (RetryHeartbeatStaleTrialCallback, "retried_trial_number", ("trial",)),
    (RetryHeartbeatStaleTrialCallback, "retry_history", ("trial",)),
    (optuna.trial.Trial, "__init__", ("study", "trial_id")),  # "not recommended" in Optuna's docs
)


def engine(storage: RDBStorage) -> "sqlalchemy.Engine":
    """The storage's SQLAlchemy engine (RDBStorage sets it as a plain attribute)."""
    return storage.engine


def trial_id(storage: RDBStorage, study_name: str, number: int) -> int:
    """The storage's id of a trial of a study."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def heartbeat_interval(storage: RDBStorage) -> int | None:
    return storage.get_heartbeat_interval()


def record_heartbeat(storage: RDBStorage, trial_id: int) -> None:
    storage.record_heartbeat(trial_id)


def set_trial_user_attr(storage: RDBStorage, study_name: str, number: int, key: str, value: Any) -> None:
    """A user attr of any trial of the study by its number (Study has no such call; FrozenTrial is read-only)."""
    storage.set_trial_user_attr(trial_id(storage, study_name, number), key, value)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials whose process stopped beating (and re-queue them, with the study's retry callback)."""
    optuna.storages.fail_stale_trials(study)


def running_trial(study: optuna.Study, storage: RDBStorage, number: int) -> optuna.Trial:
    """A live Trial for a RUNNING trial that another process (the sweeper) asked for: the job reports to it and
    asks it whether to prune. Optuna's docs discourage calling this constructor; it is the only way in."""
    return optuna.trial.Trial(study, trial_id(storage, study.study_name, number))


def stale_trial_retry() -> RetryHeartbeatStaleTrialCallback:
    """The storage's callback for a trial whose process stopped beating: FAIL, and its parameters queued once."""
    return RetryHeartbeatStaleTrialCallback(max_retry=1)


def queue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial's parameters again, marked as its retry (what the stale-trial callback does)."""
    stale_trial_retry()(study, trial)


def retried_trial_number(trial: FrozenTrial) -> int | None:
    """The number of the trial that `trial` retries, or None."""
    return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def is_retry(trial: FrozenTrial) -> bool:
    """Whether the trial is itself a retry of another."""
    return bool(RetryHeartbeatStaleTrialCallback.retry_history(trial))

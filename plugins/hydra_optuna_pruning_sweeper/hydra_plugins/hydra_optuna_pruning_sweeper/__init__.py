"""hydra-optuna-pruning-sweeper: Optuna sweeps for any Hydra app, with pruning, resume, a time budget, many
workers on one study, and MLflow runs per trial. `hydra/sweeper=optuna_pruning`.

A job reports each step to its trial, and the pruner may stop it:

    from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial

    trial = current_trial()  # a no-op outside a sweep
    for epoch in range(1, epochs + 1):
        ...
        trial.report(val_acc, step=epoch)  # raises optuna.TrialPruned when the pruner says stop

Importing this package is cheap (Hydra imports it when it scans its plugins): the names below that need Optuna,
SQLAlchemy or MLflow are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import MAX_LINE, ConfigError, JobInterrupted, StopSweep, Terminated, UserError, one_line, unresolved
from ._names import (END_REASON_ATTR, END_REASON_TAG, FAIL_REASON_ATTR, KIND_TAG, OPTIMIZED_METRIC_PARAM,
                     OVERRIDES_ATTR, PARENT_RUN_ATTR, PARENT_TAG, RUN_ID_ATTR, STUDY_KIND, STUDY_TAG,
                     TRIAL_NUMBER_TAG, TRIAL_STATE_TAG, WORKER_ATTR)
from ._redact import has_literal_password, mask_secrets
from ._trial import NoTrial, current_trial

__version__ = "0.1.0"

# name -> the private module that defines it, imported when the name is first used
_LAZY = {
    **dict.fromkeys(("RunRecorder", "check_server", "child_runs", "disk_space", "existing_client",
                     "experiment_id", "make_client", "retry_locked", "source_tags"), "_tracking"),
    **dict.fromkeys(("build_pruner", "TrialReport"), "_trial"),
    **dict.fromkeys(("make_storage", "state_counts", "suggest", "counted_trials", "quiet_optuna"), "_study"),
    **dict.fromkeys(("best_trials", "results_summary", "experiment_yaml", "history_figures", "optuna_figures",
                     "tidy_figures"), "_results"),
    **dict.fromkeys(("space_from_overrides", "set_by", "recipe"), "_space"),
    **dict.fromkeys(("file_lock", "sqlite_file"), "_locks"),
    **dict.fromkeys(("time_spent",), "_clock"),
}

__all__ = ["MAX_LINE", "ConfigError", "JobInterrupted", "StopSweep", "Terminated", "UserError", "one_line", "unresolved",
           "END_REASON_ATTR", "END_REASON_TAG", "FAIL_REASON_ATTR", "KIND_TAG", "OPTIMIZED_METRIC_PARAM",
           "OVERRIDES_ATTR", "PARENT_RUN_ATTR", "PARENT_TAG", "RUN_ID_ATTR", "STUDY_KIND", "STUDY_TAG",
           "TRIAL_NUMBER_TAG", "TRIAL_STATE_TAG", "WORKER_ATTR", "has_literal_password", "mask_secrets",
           "NoTrial", "current_trial", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value

"""Names that cross a boundary: the study's and trials' user attrs, the MLflow tags the sweeper writes, and the
environment variables that carry a trial's identity into its job. One constant each, read by the sweeper, by jobs
and by apps that look at a finished study (reports)."""

# -- Optuna user attrs ---------------------------------------------------------------------------------------------
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow parent run, reused on resume
RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow run
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why a trial failed
END_REASON_ATTR = "end_reason"  # trial user attr: why a trial ended early without failing (pruned)
OVERRIDES_ATTR = "overrides"  # trial user attr: the command-line overrides that reproduce the trial
WORKER_ATTR = "worker"  # trial user attr: host:pid of the sweeper process that claimed the trial
# trial user attr: that process's host and PID namespace ("host pid:[4026531836]"), where its pid names it: a process
# that shares it sees at once that the claimer is gone (with or without heartbeats)
WORKER_PIDS_ATTR = "worker_pid_namespace"
# trial user attr: why a claim was withdrawn before its trial ran (cut off by a dead process or a lost database
# connection): such a trial is FAIL and out of the budget
WITHDRAWN_ATTR = "withdrawn"
# study user attrs, one per invocation (sweeper process) that ran trials: [start, last seen] in Unix seconds; their
# union is the time the study has spent, which a resumed hydra.sweeper.timeout goes on from
TIME_SPENT_ATTR_PREFIX = "sweep_time:"

# -- environment variables -----------------------------------------------------------------------------------------
# A trial's job finds its trial through environment variables, so the identity crosses into launcher processes
# (joblib, SLURM) without entering the app's config. The storage URL may hold a password: it travels in the
# sweeper process's own environment, which child processes inherit, never through Hydra's saved job config.
STORAGE_ENV = "OPTUNA_SWEEP_STORAGE"  # Optuna storage URL of the study
STUDY_ENV = "OPTUNA_SWEEP_STUDY"  # study name
TRIAL_ENV = "OPTUNA_SWEEP_TRIAL"  # trial number within the study
PRUNER_ENV = "OPTUNA_SWEEP_PRUNER"  # the pruner as JSON: {"_target_": "optuna.pruners.MedianPruner", ...}
DEADLINE_ENV = "OPTUNA_SWEEP_DEADLINE"  # hydra.sweeper.timeout as a Unix time: a job's report past it stops the job
STORAGE_WAIT_ENV = "OPTUNA_SWEEP_STORAGE_WAIT"  # hydra.sweeper.storage_wait: a job's reports ride out an outage too
# set in the environment of the sweep's local worker processes only (hydra.sweeper.local_workers): JSON of
# _local_workers.LocalWorker, {"study": name, "n_trials": budget of this invocation, "report_fd": pipe}
LOCAL_WORKER_ENV = "OPTUNA_SWEEP_LOCAL_WORKER"

# -- MLflow tags and params ----------------------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting: the parent run's id on a child run
STUDY_TAG = "study"  # the Optuna study's name, on its parent run and on every trial's run
KIND_TAG = "kind"  # what a run is: STUDY_KIND on a study's parent run
STUDY_KIND = "study"
TRIAL_NUMBER_TAG = "trial_number"  # a trial's run: the Optuna trial number
TRIAL_STATE_TAG = "trial_state"  # a trial's run: the Optuna state the trial ended in (COMPLETE, PRUNED, FAIL)
END_REASON_TAG = "end_reason"  # a run ended by an exception: `Type: message`
OPTIMIZED_METRIC_PARAM = "optimized_metric"  # a study's parent run: its objectives, comma-separated
SOURCE_NAME_TAG = "mlflow.source.name"  # MLflow's own tag: what the runs table shows under Source
SOURCE_TYPE_TAG = "mlflow.source.type"  # MLflow's own tag: LOCAL for a process started from a shell

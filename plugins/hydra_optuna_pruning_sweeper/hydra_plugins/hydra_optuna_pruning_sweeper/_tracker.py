"""A sweep's MLflow records, behind one object: MlflowTracker when `mlflow.tracking_uri` is set, NullTracker (which
records nothing) when it is not, so the rest of the sweeper never asks whether MLflow is on.

One parent run per study (reused on resume), one child run per trial, made by the sweeper; the job (any app) gets
MLFLOW_RUN_ID and MLFLOW_TRACKING_URI, so a plain `mlflow.start_run()` in it logs into its trial's run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, MutableMapping

import optuna
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.trial import TrialState

from . import _results as results, _tracking as tracking
from ._names import (KIND_TAG, OPTIMIZED_METRIC_PARAM, PARENT_RUN_ATTR, PARENT_TAG, RUN_ID_ATTR, STUDY_KIND, STUDY_TAG,
                     TRIAL_NUMBER_TAG, TRIAL_STATE_TAG)
from ._redact import mask_secrets
from ._settings import Settings
from ._study import claim_lock

RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


@dataclass
class StudyRunEnd:
    """What the main process tells the study's run before it ends: set trials_over once every trial of the
    invocation has ended, so Ctrl-C or SIGTERM while summarizing leaves a FINISHED study, not a KILLED one."""

    trials_over: bool = False


def make_tracker(settings: Settings) -> "MlflowTracker | NullTracker":
    """The tracker the settings ask for; a tracking server must answer (tracking.make_client checks it)."""
    if not settings.tracking_uri:
        return NullTracker()
    return MlflowTracker(tracking.make_client(settings.tracking_uri), settings)


class NullTracker:
    """MLflow off: every record goes nowhere."""

    parent_id = None

    def export_to_jobs(self, environ: MutableMapping[str, str]) -> None:
        pass

    @contextmanager
    def study_run(self, study, storage, distributions: dict, app: str) -> Iterator[StudyRunEnd]:
        yield StudyRunEnd()

    def join_study_run(self, study) -> None:
        pass

    def trial_run(self, study_name: str, number: int) -> str | None:
        return None

    def end_trial_run(self, run_id: str | None, state: TrialState, run_status: str | None = None) -> None:
        pass

    def close_orphan_runs(self, study) -> None:
        pass

    def record_summary(self, study, summary: dict, counts: dict, best: list) -> None:
        pass


class MlflowTracker:
    """The study's parent run and its trials' child runs, through one MlflowClient."""

    def __init__(self, client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.parent_id: str | None = None
        self.experiment_id: str | None = None  # the parent's, for its children

    def export_to_jobs(self, environ: MutableMapping[str, str]) -> None:
        """For a plain mlflow.start_run() in the job, with MLFLOW_RUN_ID per trial (set by the launcher)."""
        environ["MLFLOW_TRACKING_URI"] = self.settings.tracking_uri
        # mlflow.start_run() deletes MLFLOW_RUN_ID once used, and Hydra's env_set then fails to delete it
        # again; with a value (empty: MLflow ignores it) to go back to, Hydra restores it instead
        environ.setdefault("MLFLOW_RUN_ID", "")

    @contextmanager
    def study_run(self, study, storage, distributions: dict, app: str) -> Iterator[StudyRunEnd]:
        """The study's run (reused on resume), ended with one status rule: FINISHED when the invocation ends
        normally, KILLED on Ctrl-C or SIGTERM while trials run (FINISHED once they are over), FAILED on anything
        else, whatever fails while summarizing."""
        with claim_lock(storage, study.study_name):  # workers starting together make one parent
            self.parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
            if self.parent_id is not None:
                tracking.RunRecorder.resume(self.client, self.parent_id)
            else:
                self.parent_id = self._new_parent_run(study, distributions, app)
        status, end = "FAILED", StudyRunEnd()
        try:
            yield end
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "FINISHED" if end.trials_over else "KILLED"
            raise
        finally:
            tracking.retry_locked(self.client.set_terminated, self.parent_id, status=status)

    def _new_parent_run(self, study, distributions: dict, app: str) -> str:
        s = self.settings
        tags = {STUDY_TAG: study.study_name, KIND_TAG: STUDY_KIND} | tracking.source_tags(app)
        rec = tracking.RunRecorder(self.client, s.experiment, run_name=study.study_name, tags=tags)
        rec.log_params({"study": study.study_name, "sampler": type(study.sampler).__name__,
                        "pruner": s.pruner_name, "storage": mask_secrets(str(s.storage)),
                        "directions": ",".join(s.directions),
                        OPTIMIZED_METRIC_PARAM: ",".join(s.metric_names or ["value"]),
                        **{f"space.{k}": repr(v) for k, v in distributions.items()}})
        study.set_user_attr(PARENT_RUN_ATTR, rec.run_id)
        return rec.run_id

    def join_study_run(self, study) -> None:
        """A local worker's trials go under the parent run its main process made."""
        self.parent_id = study.user_attrs.get(PARENT_RUN_ATTR)

    def trial_run(self, study_name: str, number: int) -> str | None:
        """The trial's run, made here so the job (any app) logs into it through MLFLOW_RUN_ID."""
        if self.experiment_id is None:
            self.experiment_id = self.client.get_run(self.parent_id).info.experiment_id
        run = tracking.retry_locked(self.client.create_run, self.experiment_id, run_name=f"trial-{number}",
                                    tags={PARENT_TAG: self.parent_id, TRIAL_NUMBER_TAG: str(number),
                                          STUDY_TAG: study_name})
        return run.info.run_id

    def end_trial_run(self, run_id: str | None, state: TrialState, run_status: str | None = None) -> None:
        """Tag the trial's end on its run, and end the run if the job did not (or died): with `run_status`
        (KILLED for an interrupted trial) whatever the job ended it with, else by the trial's state."""
        if not run_id:
            return
        self.client.set_tag(run_id, TRIAL_STATE_TAG, state.name)
        status = self.client.get_run(run_id).info.status
        if status == "RUNNING" or (run_status is not None and status != run_status):
            tracking.retry_locked(self.client.set_terminated, run_id, status=run_status or RUN_STATUS[state])

    def close_orphan_runs(self, study) -> None:
        """Child runs left RUNNING by a killed process, whose trial is no longer running, are marked KILLED.

        Runs are listed before trials, and re-read before they are closed: another worker's run that started or
        finished meanwhile is left alone."""
        runs = tracking.child_runs(self.client, self.parent_id, status="RUNNING")
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for run in runs:
            if int(run.data.tags.get(TRIAL_NUMBER_TAG, -1)) not in running and \
                    self.client.get_run(run.info.run_id).info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, TRIAL_STATE_TAG, "FAIL")
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def record_summary(self, study: optuna.Study, summary: dict, counts: dict, best: list) -> None:
        """The study's end on its parent run: trial counts, Optuna's plots, the results file, the best trial."""
        parent = tracking.RunRecorder.attach(self.client, self.parent_id)
        parent.log_metrics({f"trials/{k.lower()}": v for k, v in counts.items()}, step=sum(counts.values()))
        metric = self.settings.metric
        # importances of fewer trials are noise: the parent run gets them from FEW_TRIALS completed trials on
        figures = results.history_figures(study, importances_from=results.FEW_TRIALS)
        for file, fig in results.tidy_figures(figures, metric, counts.get("COMPLETE", 0)).items():
            parent.log_figure(fig, file)
        parent.log_text(OmegaConf.to_yaml(OmegaConf.create(summary)), "optimization_results.yaml")
        if len(best) == 1 and len(study.directions) == 1:
            self._record_best(parent, best[0])

    def _record_best(self, parent, trial) -> None:
        names = self.settings.metric_names or ["value"]
        parent.log_metrics({f"best/{m}": v for m, v in zip(names, trial.values)}, step=trial.number)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        parent.set_tags({f"best.{k}": v for k, v in trial.params.items()} | {"best.trial": trial.number}
                        | ({"best.run_id": run_id} if run_id else {}))
        if run_id and self.settings.on_best:
            hook = instantiate(self.settings.on_best, _partial_=True)
            for key, value in (hook(run_id=run_id, tracking_uri=self.settings.tracking_uri) or {}).items():
                parent.set_tags({f"best.{key}": value})

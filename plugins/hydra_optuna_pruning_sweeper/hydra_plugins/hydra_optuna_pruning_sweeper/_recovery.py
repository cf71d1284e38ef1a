"""Trials that stopped without an end of their own, all handled here, the same way: the trial is FAIL with the
reason, its MLflow run KILLED, and its parameters queued to run again once (the retry stands in for it in the
budget, see _study.counted_trials). How a trial gets here:

- Ctrl-C or SIGTERM while its job runs (`interrupted`);
- its job was stopped from outside: scancel, a time limit, a lost node (`stopped`, from a JobInterrupted outcome);
- its local worker process was killed (`dead_worker`): the main process knows at once, no grace period;
- its process stopped beating, in any worker on any machine (`fail_stale`, under the claim lock: Optuna's retry
  callback, set on the storage by _study.make_storage, queues the retry); not within grace_period of an outage
  of the storage, when no process could beat;
- its process is gone from this machine, heartbeats or not (`fail_stale` too): SIGKILL, the OOM killer, or a
  SIGTERM to an app that kept SIGTERM's default where the sweep could not set its own.

The MLflow runs of stale trials, and any run a dead process left RUNNING, are found by a search
(`close_orphan_runs`) when a sweep starts and when it ends: a run is only closed once its trial has ended and
the run, read again, still runs, so another worker that is ending its own trial is never overtaken.
"""

from __future__ import annotations

import logging
from typing import Sequence

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ._errors import Terminated
from ._names import RUN_ID_ATTR, WITHDRAWN_ATTR, WORKER_ATTR, WORKER_PIDS_ATTR
from ._outage import Outage
from ._optuna_adapter import fail_stale_trials, is_retry, queue_retry, retried_trial_number
from ._study import claim_lock, fail_by_number, pid_namespace, process_gone, tell

log = logging.getLogger("optuna_pruning")


class Recovery:
    """Recovery of one study's stopped trials; `tracker` (_tracker.py) ends their MLflow runs."""

    def __init__(self, study: optuna.Study, storage: RDBStorage, tracker, outage: Outage | None = None,
                 grace_s: float = 0.0) -> None:
        """`outage`: this process's patience with the storage (_outage.py); for `grace_s` seconds after one, no
        heartbeat is taken as stale (nobody could beat meanwhile)."""
        self.study = study
        self.storage = storage
        self.tracker = tracker
        self.outage = outage
        self.grace_s = grace_s

    def interrupted(self, trials: list[optuna.Trial], error: KeyboardInterrupt) -> None:
        """Ctrl-C or SIGTERM reached this process while these trials ran."""
        reason = "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted (Ctrl-C)"
        for trial in trials:
            self.stopped(trial, reason)

    def stopped(self, trial: optuna.Trial, reason: str) -> None:
        """A trial stopped from outside: its run is KILLED whatever the job made of the interruption (an app
        stopped by an exception at its time limit ends its run FAILED)."""
        retry_once(self.study, trial.number)  # first: no worker ever sees it FAIL without its retry
        tell(self.study, trial, TrialState.FAIL, None, reason)
        self.tracker.end_trial_run(trial.user_attrs.get(RUN_ID_ATTR), TrialState.FAIL, run_status="KILLED")

    def dead_worker(self, worker: str, reason: str) -> list[int]:
        """FAIL the trials a dead worker (host:pid) left RUNNING, and queue their parameters again once: its
        process is known to be gone, so they need not wait out the grace period. Under the claim lock, so no
        worker counts the budget meanwhile; returns their numbers."""
        dead = []
        with claim_lock(self.storage, self.study.study_name):
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get(WORKER_ATTR) == worker:
                    retry_once(self.study, t.number)
                    fail_by_number(self.study, self.storage, t.number, reason)
                    dead.append(t)
        for t in dead:  # after the lock: MLflow may be slow, and no one else ends these runs
            self.tracker.end_trial_run(t.user_attrs.get(RUN_ID_ATTR), TrialState.FAIL, run_status="KILLED")
        return [t.number for t in dead]

    def fail_stale(self, trials: Sequence[FrozenTrial] | None = None) -> bool:
        """FAIL (and re-queue once) the trials whose process stopped beating (with heartbeats on), and those whose
        process on this machine is gone. Called under the claim lock (their retries free room in the budget), and
        when a study is opened. `trials`: a read of the study made just before (one read per claim: each loads
        every unfinished trial). Whether it failed any of the gone ones (the stale ones keep their place in the
        budget: a stale trial's retry stands in for it)."""
        if not (self.outage and self.outage.recent(self.grace_s)):
            fail_stale_trials(self.study)
        here = pid_namespace()
        if trials is None:
            trials = self.study.get_trials(deepcopy=False)
        gone = False
        for t in trials:
            worker = t.user_attrs.get(WORKER_ATTR, "")
            if t.state != TrialState.RUNNING or not worker or WITHDRAWN_ATTR in t.user_attrs:
                continue  # a claim being made (or cut off, or withdrawn: the claim withdraws those)
            if here and t.user_attrs.get(WORKER_PIDS_ATTR) == here and process_gone(int(worker.rsplit(":", 1)[1])):
                retry_once(self.study, t.number)
                try:
                    fail_by_number(self.study, self.storage, t.number, f"its sweeper process {worker} is gone")
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # its heartbeat went stale too: failed just above (the read was made before)
                gone = True
        return gone

    def close_orphan_runs(self) -> None:
        """Runs left RUNNING whose trial is no longer running (see the module's docstring)."""
        self.tracker.close_orphan_runs(self.study)


def retry_once(study: optuna.Study, number: int) -> None:
    """Queue a stopped trial's parameters again, once: the same rule as Optuna's for a trial whose process died.
    Called before the trial is told FAIL: a worker that counts the study's failures meanwhile (they are counted
    without the claim lock) never sees it failed without its retry."""
    trials = study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == number)
    if is_retry(frozen):
        return  # itself a retry: its parameters had their second chance
    if any(retried_trial_number(t) == number for t in trials):
        return  # already queued
    queue_retry(study, frozen)

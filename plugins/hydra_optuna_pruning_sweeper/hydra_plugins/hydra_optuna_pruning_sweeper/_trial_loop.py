"""The trial loop, run by the sweep's main process (batches of n_jobs trials through Hydra's launcher) and by each
local worker (one trial at a time). A trial's life reads top to bottom:

    claim (ask: all that holds the claim lock) -> suggest -> its overrides and MLflow run -> launch -> tell

until the budget is spent and no trial runs, here or in another worker (a dead worker's trial goes stale, is
re-queued and claimed here). Each step that talks to the storage rides out an outage of it (_outage.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from hydra.utils import get_method
from omegaconf import DictConfig

from . import _study as studies
from ._clock import SweepClock
from ._errors import UserError, one_line
from ._names import FAIL_REASON_ATTR, OVERRIDES_ATTR, RUN_ID_ATTR
from ._optuna_adapter import trial_id
from ._outage import Outage, is_transient
from ._outcome import Outcome, outcome
from ._recovery import Recovery
from ._redact import mask_secrets
from ._settings import UNLIMITED, Settings
from ._space import quote, quote_value
from ._summary import budget_text, trial_end_line, trial_params_text
from ._trial import TrialRef

log = logging.getLogger("optuna_pruning")
MIN_TRIALS_FOR_RATE = 4  # with no n_trials, max_failure_rate is judged once this many trials have run
NO_HEARTBEAT_HINT = ("; without hydra.sweeper.heartbeat_interval a trial whose process died on another machine is "
                     "never failed: set it (e.g. 10 seconds) to have such trials failed and run again")


@dataclass(frozen=True)
class Pace:
    """How a role runs the loop."""

    batch: int  # trials claimed and launched together
    poll_s: float  # seconds between looks at other workers' running trials, once the budget is spent
    keeps_time: bool  # the main process keeps the study's time (hydra.sweeper.timeout) and says when it is spent
    job_number_is_trial: bool  # a local worker's job folder is named by its trial (unique among the workers)


class TrialLoop:
    def __init__(self, study: optuna.Study, storage, settings: Settings, space: tuple[dict, list[str]],
                 config: DictConfig, launcher: Any, tracker, recovery: Recovery, clock: SweepClock, n_trials: int,
                 pace: Pace, outage: Outage) -> None:
        self.study, self.storage, self.settings, self.config = study, storage, settings, config
        self.distributions, self.fixed_args = space
        self.launcher, self.tracker, self.recovery, self.clock = launcher, tracker, recovery, clock
        self.n_trials, self.pace = n_trials, pace
        self.patient = outage.call  # a storage step, retried through an outage of the storage
        self.outage = outage
        self.job_idx = 0
        self.seen = len(study.get_trials(deepcopy=False))  # the trials the sampler's seed was offset by

    def run(self) -> None:
        waiting_for = 0
        while True:
            out_of_time = self.clock.past()
            if out_of_time and not waiting_for and self.pace.keeps_time:
                log.info(f"time budget spent (hydra.sweeper.timeout={self.settings.timeout:g} s): no new trial "
                         "starts")
            batch = [] if out_of_time else self.patient(self._claim)
            if self.pace.keeps_time:
                self.patient(lambda: self.clock.record(self.study))
            if batch:
                self._check_failure_rate(self._run_batch(batch))
                continue
            tally = self.patient(lambda: studies.read_tally(self.study))
            if not (running := tally.running):
                if out_of_time or tally.used >= self.n_trials:
                    return
                continue  # a dead worker's trial, re-queued since this claim counted the budget: claim it
            if running != waiting_for:
                log.info(f"{'time' if out_of_time else 'budget'} spent; waiting for {running} running trial(s) "
                         f"of other workers to end" + (" at their next epoch" if out_of_time else "")
                         + ("" if self.settings.heartbeat_interval else NO_HEARTBEAT_HINT))
            waiting_for = running
            time.sleep(self.pace.poll_s)

    def _failures(self, tally: studies.Tally) -> tuple[int, int]:
        """(failed trials, the trials their share is of): without n_trials (timeout alone), the trials so far once
        there are a few."""
        n = self.n_trials
        return tally.failed, n if n < UNLIMITED else max(MIN_TRIALS_FOR_RATE, tally.used)

    # -- claim: ask under the lock, then suggest -------------------------------------------------------------

    def _claim(self) -> list[optuna.Trial]:
        return studies.claim_trials(self.study, self.storage, self.n_trials, self.pace.batch, self._recover,
                                    self._suggest)

    def _recover(self, trials: list[FrozenTrial]) -> bool:
        """Fail dead trials (freeing their place in the budget); whether it failed any. Workers started together
        would draw the same points from the same seed: when the study holds other trials than this worker last
        saw, its sampler is rebuilt with the seed offset by the study's size."""
        if len(trials) != self.seen:
            self.study.sampler, _ = self.settings.seeded_sampler(len(trials), self.distributions)
            self.seen = len(trials)
        return self.recovery.fail_stale(trials)

    def _suggest(self, trial: optuna.Trial) -> None:
        studies.suggest(trial, self.distributions)
        if self.settings.custom_search_space:
            get_method(self.settings.custom_search_space)(self.config, trial)
        self.seen = max(self.seen, trial.number + 1)  # the study's size now: trials are numbered in order

    # -- launch and tell: without the lock ---------------------------------------------------------------------

    def _run_batch(self, batch: list[optuna.Trial]) -> studies.Tally:
        """Launch the batch and tell each trial's end; the study counted after."""
        for trial in batch:
            log.info(f"trial {trial.number} started: {trial_params_text(trial.params)}")
        ids = self.patient(lambda: [trial_id(self.storage, self.study.study_name, t.number) for t in batch])
        try:
            # beating from before the MLflow run: making it may take a while
            with studies.heartbeat(self.storage, ids, on_error=self._beat_failed):
                jobs = self._jobs(batch)
                first = batch[0].number if self.pace.job_number_is_trial else self.job_idx
                returns = self.launcher.launch(jobs, initial_job_idx=first)
        except KeyboardInterrupt as e:
            self.recovery.interrupted(batch, e)
            raise
        except Exception as e:  # the launcher's, not a job's (Hydra returns those): e.g. an override it can't apply
            self._fail_unlaunched(batch, e)
        self.job_idx += len(returns)
        told = []
        for trial, ret in zip(batch, returns):
            end = self._tell(trial, ret)
            if end.stop is not None:
                self._end_lines(told)
                raise end.stop
            told.append((trial, end))
        return studies.tally(self._end_lines(told))

    def _end_lines(self, told: list) -> list[FrozenTrial]:
        """Each told trial's line, from one read of the study; returns that read."""
        trials = self.patient(lambda: self.study.get_trials(deepcopy=False))
        for trial, end in told:
            log.info(trial_end_line(self.study, trials, trial.number, self.n_trials, self.settings.metric_names)
                     + ("; its parameters run again once" if end.interrupted else ""))
        return trials

    def _beat_failed(self, error: Exception) -> None:
        if is_transient(error):
            self.outage.saw_outage()

    def _fail_unlaunched(self, batch: list[optuna.Trial], error: Exception) -> None:
        """The launcher failed before the jobs could return: each trial FAIL with the reason and its run FAILED, so
        none is left RUNNING; the sweep stops with one line, since the next trials would fail the same way."""
        reason = f"its job could not be launched: {mask_secrets(one_line(error))}"
        for trial in batch:
            studies.tell(self.study, trial, optuna.trial.TrialState.FAIL, None, reason)
            self.tracker.end_trial_run(trial.user_attrs.get(RUN_ID_ATTR), optuna.trial.TrialState.FAIL)
        numbers = ", ".join(str(t.number) for t in batch)
        raise UserError(f"trial {numbers} could not be launched: {mask_secrets(one_line(error))}") from None

    def _jobs(self, batch: list[optuna.Trial]) -> list[list[str]]:
        """Each trial's overrides, with its identity (and its MLflow run) for the job in env_set; a trial whose
        run cannot be made is FAIL with the reason, so none is left RUNNING."""
        try:
            return [self._job(trial) for trial in batch]
        except Exception as e:
            for trial in batch:
                studies.tell(self.study, trial, optuna.trial.TrialState.FAIL, None,
                             f"its job could not be prepared: {one_line(e)}")
                self.tracker.end_trial_run(trial.user_attrs.get(RUN_ID_ATTR), optuna.trial.TrialState.FAIL)
            raise

    def _job(self, trial: optuna.Trial) -> list[str]:
        overrides = [f"{k}={quote_value(v)}" for k, v in trial.params.items()] + self.fixed_args
        self.patient(lambda: trial.set_user_attr(OVERRIDES_ATTR, [mask_secrets(o) for o in overrides]))
        env = TrialRef("", self.study.study_name, trial.number).job_env()
        run_id = self.tracker.trial_run(self.study.study_name, trial.number)
        if run_id:
            env |= {"MLFLOW_RUN_ID": run_id}
            self.patient(lambda: trial.set_user_attr(RUN_ID_ATTR, run_id))
        return overrides + [f"++hydra.job.env_set.{k}={quote(v)}" for k, v in env.items()]

    def _tell(self, trial: optuna.Trial, ret) -> Outcome:
        """Tell the trial's end to the study and its MLflow run; its outcome (a job that stopped the sweep says so
        in `stop`)."""
        end = outcome(ret, len(self.settings.directions), trial.number)
        if end.interrupted:  # stopped from outside (scancel, a time limit), as Ctrl-C is here
            self.patient(lambda: self.recovery.stopped(trial, end.reason))
        else:
            self.patient(lambda: studies.tell(self.study, trial, end.state, end.values, end.reason))
            self.tracker.end_trial_run(trial.user_attrs.get(RUN_ID_ATTR), end.state)
        return end

    def _check_failure_rate(self, tally: studies.Tally) -> None:
        failed, of = self._failures(tally)
        if failed > self.settings.max_failure_rate * of:
            # counted again under the claim lock: there a dead worker's trial is failed and queued again as one
            # step (Optuna fails a stale trial first and queues its retry after)
            with studies.claim_lock(self.storage, self.study.study_name):
                failed, of = self._failures(self.patient(lambda: studies.read_tally(self.study)))
        if failed > self.settings.max_failure_rate * of:
            raise UserError(f"{failed} trials of the study failed, more than hydra.sweeper.max_failure_rate="
                            f"{self.settings.max_failure_rate} of its {budget_text(of)} trials; see the trials' "
                            f"'{FAIL_REASON_ATTR}' in the study")

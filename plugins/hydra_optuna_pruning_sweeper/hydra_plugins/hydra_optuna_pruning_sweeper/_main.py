"""The sweep's main process: it opens (or resumes) the study and its MLflow run, sets the jobs' environment, runs
the trials (itself, in batches through Hydra's launcher, or in local worker processes), and summarizes the
study when the invocation ends, however it ends."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import optuna
from omegaconf import DictConfig

from . import _study as studies, _worker_pool as worker_pool
from ._clock import SweepClock, time_spent
from ._errors import MAX_LINE, ConfigError, one_line
from ._launchers import check_cluster, quiet_launcher_logs, share_cores
from ._outage import Outage, patience
from ._recovery import Recovery
from ._redact import mask_secrets
from ._settings import UNLIMITED, Settings
from ._space import sample_overrides
from ._summary import budget_spent, budget_text, summarize
from ._tracker import make_tracker
from ._trial import TrialRef
from ._trial_loop import Pace, TrialLoop

log = logging.getLogger("optuna_pruning")
STORAGE_FILE = "optuna.db"  # in the sweep folder, with hydra.sweeper.storage null


class MainProcess:
    def __init__(self, settings: Settings, config: DictConfig, launcher: Any,
                 compose: Callable[[list[str]], Any]) -> None:
        """`compose`: the app's config with a trial's overrides applied (Hydra's sweep config loader)."""
        self.settings, self.config, self.launcher, self.compose = settings, config, launcher, compose
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.trials_over = False  # every trial of this invocation has ended: an interruption now costs none

    def run(self, arguments: list[str]) -> None:
        s = self.settings
        space = s.search_space(arguments)
        self._check_space(*space)
        check_cluster(self.launcher)  # before the study, its parent run or any trial exists
        name = self._study_name(space)
        url = s.storage or f"sqlite:///{self.sweep_dir.absolute() / STORAGE_FILE}"
        storage = studies.make_storage(url, s.heartbeat_interval, s.grace_period)
        tracker = make_tracker(s)  # checks that a tracking server answers, before any run or trial is made
        # the storage answered: from here on an outage of it is waited for (_outage.py)
        outage = patience(s.storage_wait, url)
        patient = outage.call
        study, grid_size = patient(lambda: self._open(storage, name, space[0]))
        recovery = Recovery(study, storage, tracker, outage, s.grace_period or 0)
        patient(recovery.fail_stale)  # their retries count as room in the budget below
        n_trials = patient(lambda: self._budget(study, grid_size))
        spent = time_spent(study.user_attrs) if s.total_budget else 0.0
        clock = SweepClock.start(s.timeout, spent)
        if s.total_budget and patient(lambda: budget_spent(study, s, n_trials, spent, self.sweep_dir)):
            return
        # the jobs' way to the study: inherited, never saved (see _names.py)
        ref = TrialRef(url, study.study_name, -1, s.pruner, clock.deadline, s.storage_wait)
        os.environ.update(ref.sweep_env())
        tracker.export_to_jobs(os.environ)
        share_cores(self.launcher, s.n_jobs)
        with tracker.study_run(study, storage, space[0], self.config.hydra.job.name) as run_end:
            time_left = "" if s.timeout is None else \
                f", {max(0.0, s.timeout - spent):.0f}/{s.timeout:g} s of hydra.sweeper.timeout left"
            used = patient(lambda: studies.budget_used(study))
            log.info(f"study {study.study_name!r} in {mask_secrets(url)}: {used}/"
                     f"{budget_text(n_trials)} trials used{time_left}; sampler {type(study.sampler).__name__}, "
                     f"pruner {s.pruner_name}, directions {s.directions}")
            recovery.close_orphan_runs()
            try:
                self._run_trials(study, storage, space, tracker, recovery, clock, n_trials, outage)
                self.trials_over = run_end.trials_over = True
            finally:
                patient(lambda: clock.record(study))
                choices = set(self.config.hydra.runtime.choices.keys())
                patient(lambda: summarize(study, s, self.sweep_dir, choices, tracker))
                recovery.close_orphan_runs()  # a dead worker's trial, failed while we ran

    def _check_space(self, distributions: dict, fixed: list[str]) -> None:
        """Before any study or trial: a space to search, a sampler that builds on it (a grid that fits), and one
        point of it that the app's config takes."""
        if not distributions and not self.settings.custom_search_space:
            raise ConfigError("nothing to search: hydra.sweeper.params is empty and the command line sweeps no key, "
                              "so every trial would run the same config; give a search space (hydra.sweeper.params "
                              "or e.g. 'x=interval(0,1)' on the command line), or repeat a run with "
                              "hydra/sweeper=basic and e.g. seed=1,2,3")
        self.settings.seeded_sampler(0, distributions)
        overrides = sample_overrides(distributions, fixed)
        try:
            self.compose(overrides)
        except Exception as e:  # Hydra's whole message: its second line is the fix ("To append ... use +key=")
            why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:MAX_LINE]
            raise ConfigError(f"the search space does not fit the app's config ({' '.join(overrides)}): "
                              f"{why or one_line(e)}") from None

    def _study_name(self, space: tuple[dict, list[str]]) -> str | None:
        """study_name, else space_name and a hash of the space, else None (Optuna then makes one up)."""
        s = self.settings
        name = s.study_name or (studies.study_name_for(s.space_name, *space) if s.space_name else None)
        return None if name is None else studies.check_study_name(name)

    def _open(self, storage, name: str | None, distributions: dict) -> tuple[optuna.Study, int | None]:
        """The study, resumed or new. Without a storage of the user's (and without total_budget) each invocation
        gets a new study, even where the sweep folder, and so its SQLite file, is used again."""
        s = self.settings
        fresh = s.storage is None and not s.total_budget
        study, grid_size = s.open_study(storage, name, distributions, fresh=fresh)
        studies.check_objectives(study, s.directions, s.metric_names)  # before set_metric_names renames them
        if s.metric_names:
            study.set_metric_names(s.metric_names)
        if name is not None and study.study_name != name:
            log.info(f"study {name!r} is already in {self.sweep_dir / STORAGE_FILE} from an earlier invocation; "
                     f"this one is {study.study_name!r} (hydra.sweeper.storage null: a new study each invocation; "
                     "set hydra.sweeper.total_budget=true or a storage to continue one)")
        return study, grid_size

    def _budget(self, study: optuna.Study, grid_size: int | None) -> int:
        """This invocation's n_trials as a total of the study's trials, capped by the grid's size."""
        s = self.settings
        if s.n_trials is None:
            n_trials = UNLIMITED
        else:
            n_trials = s.n_trials if s.total_budget else studies.budget_used(study) + s.n_trials
        return min(n_trials, grid_size) if grid_size else n_trials

    def _run_trials(self, study, storage, space, tracker, recovery: Recovery, clock: SweepClock,
                    n_trials: int, outage: Outage) -> None:
        s = self.settings
        n_workers = min(s.n_jobs, max(1, n_trials - studies.budget_used(study)))
        if worker_pool.wanted(s.local_workers, self.launcher, n_workers):
            worker_pool.run(study, recovery, n_workers, n_trials, clock, self.sweep_dir,
                            self.config.hydra.runtime.cwd)
            return
        quiet_launcher_logs()
        pace = Pace(batch=s.n_jobs, poll_s=max(1, s.heartbeat_interval or 1), keeps_time=True,
                    job_number_is_trial=False)
        TrialLoop(study, storage, s, space, self.config, self.launcher, tracker, recovery, clock, n_trials,
                  pace, outage).run()

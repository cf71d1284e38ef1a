"""A local worker process (`hydra.sweeper.local_workers: true`), started by the main process (_worker_pool.py) with
the sweep's own command line: the main process has made the study, its MLflow parent run and the jobs'
environment (the storage URL); a worker claims and runs one trial at a time until the budget is spent and no
trial runs, and leaves the summary and the best config to the main process."""

from __future__ import annotations

import os
import time
from typing import Any

from omegaconf import DictConfig

from . import _study as studies
from ._clock import SweepClock, deadline_from_env
from ._launchers import quiet_launcher_logs
from ._local_workers import LocalWorker
from ._names import STORAGE_ENV
from ._outage import patience
from ._recovery import Recovery
from ._settings import Settings
from ._tracker import make_tracker
from ._trial_loop import Pace, TrialLoop

# a sibling's trial ends within seconds, and the last one to end ends the sweep's wall time
PACE = Pace(batch=1, poll_s=1, keeps_time=False, job_number_is_trial=True)


class WorkerProcess:
    def __init__(self, settings: Settings, config: DictConfig, launcher: Any, worker: LocalWorker) -> None:
        self.settings, self.config, self.launcher, self.worker = settings, config, launcher, worker

    def run(self, arguments: list[str]) -> None:
        s = self.settings
        space = s.search_space(arguments, warn=False)  # the main process has said what it left out
        url = os.environ[STORAGE_ENV]
        storage = studies.make_storage(url, s.heartbeat_interval, s.grace_period)
        tracker = make_tracker(s)
        outage = patience(s.storage_wait, url)  # the storage answered: from here on an outage is waited for
        study, _ = outage.call(lambda: s.open_study(storage, self.worker.study, space[0]))
        tracker.join_study_run(study)
        recovery = Recovery(study, storage, tracker, outage, s.grace_period or 0)
        outage.call(recovery.fail_stale)
        # the main process keeps the study's time; a worker only keeps to its deadline
        clock = SweepClock("", time.time(), deadline_from_env(os.environ))
        quiet_launcher_logs()
        TrialLoop(study, storage, s, space, self.config, self.launcher, tracker, recovery, clock,
                  self.worker.n_trials, PACE, outage).run()

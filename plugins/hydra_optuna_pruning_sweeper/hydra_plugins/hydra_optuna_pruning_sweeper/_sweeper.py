"""The sweeper behind `hydra/sweeper=optuna_pruning` (the facade in optuna_pruning_sweeper.py imports this module
when a sweep starts): the hydra-optuna-sweeper plugin's search-space grammar and samplers, for any Hydra app, plus
what that plugin lacks. It reads only its own settings (`hydra.sweeper.*`) and knows nothing of the app it sweeps.

    python my_app.py --multirun hydra/sweeper=optuna_pruning 'x=interval(-5,5)' hydra.sweeper.n_trials=30

- Pruning: a job calls `current_trial().report(value, step)` (this package's) per epoch; the pruner
  (`hydra/sweeper/pruner=median|hyperband|successive_halving|none`) stops it by raising optuna.TrialPruned.
  The trial's identity reaches the job through environment variables, so basic, joblib and SLURM jobs all prune.
- Resume (`total_budget: true`): `n_trials` is the study's total; the same command continues the same study, and
  trials of dead or interrupted processes are failed and re-run once (`heartbeat_interval`).
- Workers: the same command on many machines shares one study and its budget exactly (claims under a lock).
  With `local_workers: true` the sweep starts n_jobs such workers on this machine itself (_local_workers.py):
  a core takes the next trial as soon as its own ends or is pruned, with no batch barrier.
- MLflow (`mlflow.tracking_uri`): one parent run per study, one child run per trial, created here; the job gets
  MLFLOW_RUN_ID and MLFLOW_TRACKING_URI, so a plain `mlflow.start_run()` in the app logs into its trial's run.
- The winner: `best_config_dir` gets the best trial as an experiment config; `on_best` is called with its run.

A trial's life reads top to bottom in `_run_trials`: claim (ask, under the lock) -> launch -> tell.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
import sqlalchemy
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from . import _local_workers as local_workers, _results as results, _study as studies, _tracking as tracking
from ._clock import SweepClock, deadline_from_env, time_spent
from ._errors import ConfigError, StopSweep, Terminated, UserError, one_line
from ._names import (END_REASON_ATTR, FAIL_REASON_ATTR, KIND_TAG, OPTIMIZED_METRIC_PARAM, OVERRIDES_ATTR,
                     PARENT_RUN_ATTR, PARENT_TAG, RUN_ID_ATTR, STORAGE_ENV, STUDY_KIND, STUDY_TAG, TRIAL_NUMBER_TAG,
                     TRIAL_STATE_TAG)
from ._optuna_adapter import trial_id
from ._outcome import outcome
from ._redact import mask_secrets
from ._space import grid_choices, quote, quote_value, recipe, set_by, space_from_overrides
from ._trial import TrialRef

log = logging.getLogger("optuna_pruning")
SAMPLER_TARGETS = ("optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*")  # upstream's configs too
SIGNIFICANT_DIGITS = 4  # floats in the trial lines printed to the user
# the _target_ of a launcher config that picks the SLURM launcher of this package (the [slurm] extra)
SLURM_LAUNCHER = "hydra_plugins.hydra_optuna_pruning_sweeper._slurm.SlurmLauncher"
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}
UNLIMITED = 2**31 - 1  # n_trials when only hydra.sweeper.timeout ends the sweep
MIN_TRIALS_FOR_RATE = 4  # with no n_trials, max_failure_rate is judged once this many trials have run


# -- the sweeper --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """The checked settings of one sweep."""

    n_trials: int | None  # None: the timeout alone ends the sweep
    timeout: float | None  # seconds
    n_jobs: int
    max_failure_rate: float
    heartbeat_interval: int | None
    grace_period: int | None
    directions: list[str]


class SweepRun:
    """One invocation of the sweeper (the facade in optuna_pruning_sweeper.py builds it when the sweep starts)."""

    def __init__(self, sampler: DictConfig, pruner: Any = None, direction: Any = "minimize", storage: Any = None,
                 study_name: str | None = None, n_trials: Any = 20, timeout: Any = None, n_jobs: Any = 2,
                 max_failure_rate: Any = 0.0,
                 params: DictConfig | None = None, custom_search_space: str | None = None,
                 total_budget: bool = False, space_name: str | None = None, heartbeat_interval: Any = None,
                 grace_period: Any = None, metric_names: Any = None, mlflow: Any = None,
                 local_workers: bool = False, best_config_dir: str | None = None, best_config_exclude: Any = (),
                 on_best: Any = None) -> None:
        # Checked in sweep(), where a bad value is one error line; raised here it would be Hydra's traceback
        self.raw = dict(n_trials=n_trials, timeout=timeout, n_jobs=n_jobs, max_failure_rate=max_failure_rate,
                        heartbeat_interval=heartbeat_interval, grace_period=grace_period, direction=direction)
        self.sampler_cfg = sampler
        self.pruner_spec = json.dumps(OmegaConf.to_container(pruner, resolve=True) if pruner else {})
        self.storage_url = storage
        self.study_name = study_name
        self.params = params
        self.custom_search_space = custom_search_space
        self.total_budget = total_budget
        self.space_name = space_name
        self.metric_names = list(metric_names) if metric_names else None
        self.mlflow = OmegaConf.to_container(mlflow, resolve=True) if mlflow else {}
        self.local_workers = local_workers
        self.worker: local_workers.LocalWorker | None = None  # set in a local worker process
        self.best_config_dir = best_config_dir
        self.best_config_exclude = tuple(best_config_exclude or ())
        self.on_best = on_best
        self.client = None
        self.job_idx = 0
        self.clock = SweepClock("", 0.0, None)  # set when a sweep starts (hydra.sweeper.timeout)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        register_slurm_launcher(config.hydra.launcher)
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        self.worker = local_workers.LocalWorker.from_env(os.environ)
        # A local worker hands its error line to the main process, which shows the first failure's line only
        say = self.worker.report if self.worker else functools.partial(print, file=sys.stderr)
        studies.quiet_optuna()
        try:
            if self.worker is not None:
                local_workers.stop_once_on_signals()
            self._sweep(check_settings(**self.raw), arguments)
        except (UserError, StopSweep) as e:
            say(f"error: {mask_secrets(str(e))}")
            raise SystemExit(2) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # read-only, gone
            say(f"error: Optuna storage {mask_secrets(str(self.storage_url))!r} (hydra.sweeper.storage) failed: "
                f"{mask_secrets(one_line(e))}; finished trials are kept, run the same command again to resume")
            raise SystemExit(2) from None
        except local_workers.WorkerFailed as e:
            print(e.line, file=sys.stderr)
            raise SystemExit(e.code) from None
        except KeyboardInterrupt as e:
            if self.worker is None:  # the main process says it once, for its workers too
                how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
                print(f"{how}: the running trial is marked FAIL in the study (its parameters run again on resume) "
                      "and its MLflow run KILLED; run the same command again to resume", file=sys.stderr)
            raise SystemExit(143 if isinstance(e, Terminated) else 130) from None

    def _sweep(self, settings: Settings, arguments: list[str]) -> None:
        distributions, fixed_args = self._search_space(arguments, warn=self.worker is None)
        if self.worker is not None:
            self._work(settings, distributions, fixed_args)
            return
        check_cluster(self.launcher)  # before the study, its parent run or any trial exists
        url = self.storage_url or f"sqlite:///{Path(self.config.hydra.sweep.dir).absolute() / 'optuna.db'}"
        name = self.study_name or (studies.study_name_for(self.space_name, distributions, fixed_args)
                                   if self.space_name else None)
        if name is not None:
            studies.check_study_name(name)
        storage, study, grid_size = self._open(url, name, settings, distributions)
        if self.metric_names:
            study.set_metric_names(self.metric_names)
        if settings.n_trials is None:
            n_trials = UNLIMITED
        else:
            n_trials = settings.n_trials if self.total_budget else studies.budget_used(study) + settings.n_trials
        n_trials = min(n_trials, grid_size) if grid_size else n_trials
        spent = time_spent(study.user_attrs) if self.total_budget else 0.0
        self.clock = SweepClock.start(settings.timeout, spent)
        if self.total_budget and self._budget_spent(study, n_trials, settings.timeout, spent):
            return
        ref = TrialRef(url, study.study_name, -1, self.pruner_spec, self.clock.deadline)
        os.environ.update(ref.sweep_env())  # the jobs' way to the study: inherited, never saved (see study.py)
        if self.client is not None:  # for a plain mlflow.start_run() in the job, with MLFLOW_RUN_ID per trial
            os.environ["MLFLOW_TRACKING_URI"] = self.mlflow["tracking_uri"]
            # mlflow.start_run() deletes MLFLOW_RUN_ID once used, and Hydra's env_set then fails to delete it
            # again; with a value (empty: MLflow ignores it) to go back to, Hydra restores it instead
            os.environ.setdefault("MLFLOW_RUN_ID", "")
        share_cores(type(self.launcher).__name__, settings.n_jobs)
        with self._parent_run(study, storage, distributions, settings.directions) as parent_id:
            time_left = "" if settings.timeout is None else \
                f", {max(0.0, settings.timeout - spent):.0f}/{settings.timeout:g} s of hydra.sweeper.timeout left"
            log.info(f"study {study.study_name!r} in {mask_secrets(url)}: {studies.budget_used(study)}/"
                     f"{budget_text(n_trials)} trials used{time_left}; sampler {type(study.sampler).__name__}, pruner "
                     f"{json.loads(self.pruner_spec).get('_target_') or 'none'}, directions {settings.directions}")
            self._close_orphan_runs(study, parent_id)
            n_workers = min(settings.n_jobs, max(1, n_trials - studies.budget_used(study)))
            try:
                if self._local_workers_run(n_workers):
                    self._run_local_workers(study, storage, n_workers, n_trials, parent_id)
                else:
                    self._run_trials(study, storage, settings, distributions, fixed_args, parent_id, n_trials)
            finally:
                self.clock.record(study)
                self._summarize(study, parent_id)

    def _open(self, url: str, name: str | None, settings: Settings, distributions: dict
              ) -> tuple[optuna.storages.RDBStorage, optuna.Study, int | None]:
        """The storage (checked: it answers), the MLflow client (checked the same way), and the study with its
        seeded sampler; the grid's size with a grid sampler."""
        storage = studies.make_storage(url, settings.heartbeat_interval, settings.grace_period)
        if self.mlflow.get("tracking_uri"):
            experiment = self.mlflow.get("experiment")
            if not isinstance(experiment, str) or not experiment.strip():  # before any run or trial is made
                raise ConfigError(f"hydra.sweeper.mlflow.experiment={experiment!r} must be a non-empty name")
            self.client = tracking.make_client(self.mlflow["tracking_uri"])  # checks a tracking server answers
        sampler, grid_size = self._seeded_sampler(0, distributions)
        study = studies.open_study(storage, name, settings.directions, sampler)
        if self.seeded_for != len(study.get_trials(deepcopy=False)):
            study.sampler, grid_size = self._seeded_sampler(len(study.get_trials(deepcopy=False)), distributions)
        return storage, study, grid_size

    # -- local workers -----------------------------------------------------------------------------------------

    def _local_workers_run(self, n_workers: int) -> bool:
        """Whether this sweep's trials run in local worker processes: asked for, more than one trial to run at once,
        and Hydra's basic launcher (which runs a job in the process that launches it; joblib and SLURM bring
        their own processes, and get batches)."""
        if not self.local_workers or n_workers < 2:
            return False
        launcher = type(self.launcher).__name__
        if launcher != "BasicLauncher" or not local_workers.SUPPORTED:
            where = launcher if local_workers.SUPPORTED else f"{launcher} on {os.name}"
            log.info(f"hydra.sweeper.local_workers: {where} runs batches of n_jobs trials instead (local workers "
                     "need Hydra's basic launcher on a POSIX system)")
            return False
        return True

    def _run_local_workers(self, study, storage, n_workers: int, n_trials: int, parent_id: str | None) -> None:
        """n_workers copies of this command run the trials; this process only waits for them (an app's torch is
        initialised here already, and thread counts are fixed when a process starts). It stops them all when one
        fails, forwards Ctrl-C and SIGTERM, and fails (and re-queues once) the trial of one that is killed, at
        once, for the others to re-run."""
        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        command = local_workers.worker_command(sys.orig_argv, sys.executable, sweep_dir)
        threads = local_workers.thread_env(os.environ, n_workers, os.cpu_count()).get(
            "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))

        def on_death(proc: subprocess.Popen) -> None:
            how = local_workers.signal_name(proc.returncode)
            failed = self._fail_trials_of(study, storage, f"{socket.gethostname()}:{proc.pid}",
                                          f"its local worker process {proc.pid} was killed ({how})", parent_id)
            log.warning(f"local worker {proc.pid} was killed ({how}); "
                        + (f"its trial {', '.join(map(str, failed))} is FAIL and queued again for the other workers"
                           if failed else "it held no trial"))

        with local_workers.Workers.start(n_workers, command, self.config.hydra.runtime.cwd, os.environ,
                                         study.study_name, n_trials, os.cpu_count(), on_death) as workers:
            log.info(f"{n_workers} local worker processes (pids {', '.join(map(str, workers.pids))}), "
                     f"{threads} OpenMP thread(s) each; each takes the next trial as soon as its own ends")
            failed = workers.wait()
            lines = workers.failure_lines()
        if failed is None and self.clock.past():
            log.info("time budget spent (hydra.sweeper.timeout): no new trial started after it, running ones "
                     "stopped at their next epoch")
        if failed is not None:
            raise local_workers.WorkerFailed(failed.returncode, lines[0] if lines else (
                f"local worker {failed.pid} ended with {local_workers.signal_name(failed.returncode)}; the other "
                "workers were stopped (their trials are FAIL and run again on resume)"))
        used = studies.budget_used(study)
        if (used < n_trials and not self.clock.past()) or studies.running_count(study):
            raise local_workers.WorkerFailed(1, f"error: every local worker was killed before the study's budget was "
                                                f"spent ({used}/{n_trials} trials); run the same command again to "
                                                "resume")

    def _work(self, settings: Settings, distributions: dict, fixed_args: list[str]) -> None:
        """A local worker: the main process has made the study, its MLflow parent run and the jobs' environment
        (the storage URL); this claims and runs one trial at a time until the budget is spent and no trial runs,
        and leaves the summary and the best config to the main process."""
        storage, study, _ = self._open(os.environ[STORAGE_ENV], self.worker.study, settings, distributions)
        # the main process keeps the study's time; a worker only keeps to its deadline
        self.clock = SweepClock("", time.time(), deadline_from_env(os.environ))
        parent_id = study.user_attrs.get(PARENT_RUN_ATTR) if self.client is not None else None
        self._run_trials(study, storage, replace(settings, n_jobs=1), distributions, fixed_args, parent_id,
                         self.worker.n_trials)

    def _fail_trials_of(self, study, storage, worker: str, reason: str, parent_id: str | None) -> list[int]:
        """FAIL the trials a dead worker left RUNNING, and queue their parameters again once: its process is known
        to be gone, so they need not wait out the grace period. Under the claim lock, with the claims."""
        with studies.claim_lock(storage, study.study_name):
            numbers = studies.fail_running_trials_of(study, storage, worker, reason)
            for number in numbers:
                retry_once(study, number)
        self._close_orphan_runs(study, parent_id)
        return numbers

    # -- the search space ------------------------------------------------------------------------------------------

    def _search_space(self, arguments: list[str], warn: bool = True) -> tuple[dict, list[str]]:
        """The distributions to sample and the fixed overrides of every trial.

        A key the user sets on the command line wins over the search space: `model=small` leaves out the
        space's model.* keys and `model.fc_width=64` its model.fc_width, and the sweep says which it left out."""
        try:
            given, given_fixed, given_other = space_from_overrides(list(arguments))
            space, space_fixed, space_other = space_from_overrides(
                [f"{k}={v}" for k, v in (self.params or {}).items()])
        except Exception as e:
            raise ConfigError(f"search space could not be parsed ({type(e).__name__}: {e}); use the plugin's "
                              "grammar, e.g. 'x=interval(0.1,0.6)', 'y=choice(64,128)', "
                              "'lr=tag(log,interval(1e-4,1e-1))'") from None
        user_keys = list(given_fixed) + [k.lstrip("~") for k in given_other]
        dropped = sorted(k for k in list(space) + list(space_fixed) if set_by(k, user_keys) and k not in given)
        if dropped and warn:
            log.warning(f"search space: left out {', '.join(dropped)}: fixed on the command line")
        distributions = {k: v for k, v in space.items() if k not in dropped} | given
        fixed = {k: v for k, v in space_fixed.items() if k not in dropped and k not in given} | given_fixed
        for key in given:
            fixed.pop(key, None)
        return distributions, [f"{k}={v}" for k, v in fixed.items()] + space_other + given_other

    def _seeded_sampler(self, existing: int, distributions: dict) -> tuple[optuna.samplers.BaseSampler, int | None]:
        """The sampler, its seed offset by the trials already in the study so a resumed study draws new points;
        GridSampler gets its grid from the space (and the grid's size caps the budget) and keeps its seed."""
        self.seeded_for = existing
        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        seed = cfg.get("seed")
        if seed is not None:
            cfg["seed"] = studies.reseeded(seed, existing)
        try:
            sampler = instantiate(cfg, _execution_whitelist_=SAMPLER_TARGETS)
        except Exception as e:
            raise ConfigError(f"hydra.sweeper.sampler: {cfg.get('_target_')!r} could not be built: "
                              f"{one_line(e)}") from None
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {k: grid_choices(k, d) for k, d in distributions.items()}
            # The seed shuffles the grid, and the study knows a point by its place in that order: every worker
            # and every resume must keep the user's seed, or they run some points twice and others never
            grid_sampler = sampler.func(grid, **(sampler.keywords | {"seed": seed}))
            return grid_sampler, math.prod(len(v) for v in grid.values())
        return sampler, None

    def _reseed_if_others_claimed(self, study: optuna.Study, distributions: dict) -> None:
        """Workers started together would draw the same points from the same seed: when the study holds other
        trials than this worker last saw, its sampler is rebuilt with the seed offset by the study's size."""
        existing = len(study.get_trials(deepcopy=False))
        if existing != self.seeded_for:
            study.sampler, _ = self._seeded_sampler(existing, distributions)

    # -- the trials ------------------------------------------------------------------------------------------------

    def _run_trials(self, study, storage, settings: Settings, distributions: dict, fixed_args: list[str],
                    parent_id: str | None, n_trials: int) -> None:
        """Claim, launch and tell trials until the budget is spent and none is running, here or in another
        worker (a dead worker's trial goes stale, is re-queued and claimed here)."""
        jobs: dict[int, list[str]] = {}

        def prepare(trial: optuna.Trial) -> None:  # under the claim lock: the next worker sees it claimed
            studies.suggest(trial, distributions)
            if self.custom_search_space:
                get_method(self.custom_search_space)(self.config, trial)
            overrides = [f"{k}={v}" for k, v in trial.params.items()] + fixed_args
            trial.set_user_attr(OVERRIDES_ATTR, [mask_secrets(o) for o in overrides])
            env = TrialRef("", study.study_name, trial.number).job_env()
            run_id = self._child_run(study, trial, parent_id)
            if run_id:
                env |= {"MLFLOW_RUN_ID": run_id}
                trial.set_user_attr(RUN_ID_ATTR, run_id)
            jobs[trial.number] = overrides + [f"++hydra.job.env_set.{k}={quote(v)}" for k, v in env.items()]
            self.seeded_for = len(study.get_trials(deepcopy=False))

        quiet_launcher_logs()
        waiting_for = 0
        while True:
            out_of_time = self.clock.past()
            if out_of_time and not waiting_for and self.worker is None:
                log.info(f"time budget spent (hydra.sweeper.timeout={settings.timeout:g} s): no new trial starts")
            batch = [] if out_of_time else studies.claim_trials(
                study, storage, n_trials, settings.n_jobs, lambda s: self._reseed_if_others_claimed(s, distributions),
                prepare)
            if self.worker is None:
                self.clock.record(study)
            if not batch:
                if not (running := studies.running_count(study)):
                    if out_of_time or studies.budget_used(study) >= n_trials:
                        return
                    continue  # a dead worker's trial, re-queued since this claim counted the budget: claim it
                if running != waiting_for:
                    log.info(f"{'time' if out_of_time else 'budget'} spent; waiting for {running} running trial(s) "
                             f"of other workers to end" + (" at their next epoch" if out_of_time else ""))
                waiting_for = running
                # a local worker's sibling ends within seconds, and it ends the sweep's wall time
                time.sleep(1 if self.worker else max(1, settings.heartbeat_interval or 1))
                continue
            for trial in batch:
                log.info(f"trial {trial.number} started: {trial_params_text(trial.params)}")
            try:
                ids = [trial_id(storage, study.study_name, t.number) for t in batch]
                with studies.heartbeat(storage, ids):
                    # a worker's job folder is named by its trial (unique among the workers)
                    returns = self.launcher.launch([jobs.pop(t.number) for t in batch],
                                                   initial_job_idx=batch[0].number if self.worker else self.job_idx)
            except KeyboardInterrupt as e:
                reason = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
                for trial in batch:
                    self._tell(study, trial, TrialState.FAIL, None, reason, run_status="KILLED")
                    retry_once(study, trial.number)
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(batch, returns):
                state, values, reason, stop, interrupted = outcome(ret, len(settings.directions), trial.number)
                # a job stopped from outside (scancel, a time limit) is an interruption, as Ctrl-C is here
                self._tell(study, trial, state, values, reason, run_status="KILLED" if interrupted else None)
                if interrupted:
                    retry_once(study, trial.number)
                if stop is not None:
                    raise stop
                log.info(trial_end_line(study, trial.number, n_trials, self.metric_names)
                         + ("; its parameters run again once" if interrupted else ""))
            failed = studies.failed_count(study)
            # without n_trials (timeout alone) the share is of the trials so far, once there are a few
            of = n_trials if n_trials < UNLIMITED else max(MIN_TRIALS_FOR_RATE, studies.budget_used(study))
            if failed > settings.max_failure_rate * of:
                raise UserError(f"{failed} trials of the study failed, more than hydra.sweeper.max_failure_rate="
                                f"{settings.max_failure_rate} of its {budget_text(of)} trials; see the trials' "
                                f"'{FAIL_REASON_ATTR}' in the study")

    def _tell(self, study, trial, state: TrialState, values, reason: str | None = None,
              run_status: str | None = None) -> None:
        """Tell the trial's end to the study and to its MLflow run; a job that stopped the sweep stops it here."""
        if reason:
            trial.set_user_attr(FAIL_REASON_ATTR if state == TrialState.FAIL else END_REASON_ATTR,
                                mask_secrets(reason)[:2000])
        try:
            study.tell(trial, values=values, state=state, skip_if_finished=True)
        except RuntimeError as e:  # GridSampler calls study.stop() on its last point; the state is stored
            if "Study.stop" not in str(e):
                raise
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if self.client is not None and run_id:
            self.client.set_tag(run_id, TRIAL_STATE_TAG, state.name)
            status = self.client.get_run(run_id).info.status
            # RUNNING: the job did not end it (or died); an interrupted trial's run is KILLED, whatever the job
            # made of the interruption (an app stopped by an exception at its time limit ends it FAILED)
            if status == "RUNNING" or (run_status is not None and status != run_status):
                tracking.retry_locked(self.client.set_terminated, run_id, status=run_status or RUN_STATUS[state])

    # -- MLflow --------------------------------------------------------------------------------------------------

    @contextmanager
    def _parent_run(self, study, storage, distributions: dict, directions: list[str]) -> Iterator[str | None]:
        """The study's MLflow run (reused on resume), ended with one status rule: FINISHED when the invocation
        ends normally, KILLED on Ctrl-C or SIGTERM, FAILED on anything else, whatever fails while summarizing."""
        if self.client is None:
            yield None
            return
        with studies.claim_lock(storage, study.study_name):  # workers starting together make one parent
            parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
            if parent_id is not None:
                tracking.RunRecorder.resume(self.client, parent_id)
            else:
                parent_id = self._new_parent_run(study, distributions, directions)
        status = "FAILED"
        try:
            yield parent_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.retry_locked(self.client.set_terminated, parent_id, status=status)

    def _new_parent_run(self, study, distributions: dict, directions: list[str]) -> str:
        tags = {STUDY_TAG: study.study_name, KIND_TAG: STUDY_KIND} | tracking.source_tags(self.config.hydra.job.name)
        rec = tracking.RunRecorder(self.client, self.mlflow["experiment"], run_name=study.study_name, tags=tags)
        rec.log_params({"study": study.study_name, "sampler": type(study.sampler).__name__,
                        "pruner": json.loads(self.pruner_spec).get("_target_") or "none",
                        "storage": mask_secrets(str(self.storage_url)), "directions": ",".join(directions),
                        OPTIMIZED_METRIC_PARAM: ",".join(self.metric_names or ["value"]),
                        **{f"space.{k}": repr(v) for k, v in distributions.items()}})
        study.set_user_attr(PARENT_RUN_ATTR, rec.run_id)
        return rec.run_id

    def _child_run(self, study, trial, parent_id: str | None) -> str | None:
        """The trial's MLflow run, made here so the job (any app) logs into it through MLFLOW_RUN_ID."""
        if self.client is None:
            return None
        parent = self.client.get_run(parent_id)
        run = tracking.retry_locked(self.client.create_run, parent.info.experiment_id, run_name=f"trial-{trial.number}",
                                    tags={PARENT_TAG: parent_id, TRIAL_NUMBER_TAG: str(trial.number),
                                          STUDY_TAG: study.study_name})
        return run.info.run_id

    def _close_orphan_runs(self, study, parent_id: str | None) -> None:
        """Child runs left RUNNING by a killed process, whose trial is no longer running, are marked KILLED.

        Runs are listed before trials, and re-read before they are closed: another worker's run that started or
        finished meanwhile is left alone."""
        if self.client is None:
            return
        runs = tracking.child_runs(self.client, parent_id, status="RUNNING")
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for run in runs:
            if int(run.data.tags.get(TRIAL_NUMBER_TAG, -1)) not in running and \
                    self.client.get_run(run.info.run_id).info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, TRIAL_STATE_TAG, "FAIL")
                self.client.set_terminated(run.info.run_id, status="KILLED")

    # -- the end of an invocation ------------------------------------------------------------------------------

    def _budget_spent(self, study: optuna.Study, n_trials: int, timeout: float | None, spent: float) -> bool:
        """A finished study's command says so in one line, and leaves nothing behind (no run, no folder).
        open_study has just failed the trials of dead processes, so their retries count as room."""
        used = studies.budget_used(study)
        out_of_time = timeout is not None and spent >= timeout
        if (used < n_trials and not out_of_time) or studies.running_count(study):
            return False
        best = results.best_trials(study)
        metric = (self.metric_names or ["value"])[0]
        found = f"; best trial #{best[0].number}: {metric}={best[0].value:.4f}" if len(best) == 1 else ""
        if out_of_time:
            log.info(f"study {study.study_name!r} has used its time budget ({spent:.0f} s of hydra.sweeper.timeout="
                     f"{timeout:g}; {used} trials){found}. To run more, raise it: hydra.sweeper.timeout="
                     f"{timeout + max(60, timeout // 2):g} (the total, not the additional seconds)")
        else:
            log.info(f"study {study.study_name!r} has used its budget ({used}/{n_trials} trials){found}. To run "
                     f"more, raise it: hydra.sweeper.n_trials={n_trials + max(1, n_trials // 2)} (the total, not "
                     "the additional trials)")
        try:
            Path(self.config.hydra.sweep.dir).rmdir()  # made by Hydra's output-folder check; only if empty
        except OSError:
            pass
        return True

    def _summarize(self, study: optuna.Study, parent_id: str | None) -> None:
        summary = results.results_summary(study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        best = results.best_trials(study)
        if len(best) == 1 and len(study.directions) == 1:
            log.info(f"best trial {best[0].number}: {(self.metric_names or ['value'])[0]}={best[0].value:.4f} "
                     f"{trial_params_text(best[0].params)}")
            if self.best_config_dir:
                self._write_best_config(best[0], study.study_name)
        elif best:
            log.info(f"Pareto front: {len(best)} trials: " + "; ".join(f"#{t.number} {t.values}" for t in best))
        counts = studies.state_counts(study)
        log.info(f"trials by state: {', '.join(f'{k} {v}' for k, v in counts.items() if v)}")
        if parent_id is not None:
            self._record_on_parent(study, parent_id, summary, counts, best)

    def _record_on_parent(self, study, parent_id: str, summary: dict, counts: dict, best: list) -> None:
        parent = tracking.RunRecorder.attach(self.client, parent_id)
        parent.log_metrics({f"trials/{k.lower()}": v for k, v in counts.items()}, step=sum(counts.values()))
        completed = counts.get("COMPLETE", 0)
        metric = (self.metric_names or ["value"])[0]
        for file, fig in results.tidy_figures(results.history_figures(study), metric, completed).items():
            parent.log_figure(fig, file)
        parent.log_text(OmegaConf.to_yaml(OmegaConf.create(summary)), "optimization_results.yaml")
        if len(best) == 1 and len(study.directions) == 1:
            trial = best[0]
            names = self.metric_names or ["value"]
            parent.log_metrics({f"best/{m}": v for m, v in zip(names, trial.values)}, step=trial.number)
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            parent.set_tags({f"best.{k}": v for k, v in trial.params.items()} | {"best.trial": trial.number}
                            | ({"best.run_id": run_id} if run_id else {}))
            if run_id and self.on_best:
                hook = instantiate(self.on_best, _partial_=True)
                for key, value in (hook(run_id=run_id, tracking_uri=self.mlflow["tracking_uri"]) or {}).items():
                    parent.set_tags({f"best.{key}": value})
        self._close_orphan_runs(study, parent_id)  # a dead worker's trial, failed while we ran

    def _write_best_config(self, trial, name: str) -> None:
        choices, values = recipe(trial.user_attrs.get(OVERRIDES_ATTR, []),
                                 set(self.config.hydra.runtime.choices.keys()), self.best_config_exclude)
        folder = Path(self.best_config_dir) / "experiment"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_best.yaml"
        path.write_text(results.experiment_yaml(choices, values,
                                                f"best trial {trial.number} of study {name}: {trial.value}"))
        app = Path(sys.argv[0]).name
        plain = [f"{k}={v}" for k, v in choices.items()] + [f"{k}={quote_value(v)}" for k, v in values.items()]
        log.info(f"best config written to {path}; re-run it with:\n    {app} experiment={shlex.quote(name + '_best')}"
                 f"\n    (or: {app} {' '.join(shlex.quote(o) for o in plain)})")


# -- small pure helpers --------------------------------------------------------------------------------------------

def check_settings(n_trials: Any, timeout: Any, n_jobs: Any, max_failure_rate: Any, heartbeat_interval: Any,
                   grace_period: Any, direction: Any) -> Settings:
    """The sweeper's own settings, checked: each bad one is one line naming it and what is allowed."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise ConfigError(f"hydra.sweeper.timeout={timeout!r} must be a number of seconds > 0, or null (no limit)")
    if n_trials is None and timeout is None:
        raise ConfigError("hydra.sweeper.n_trials=null needs hydra.sweeper.timeout (seconds): with neither, the "
                          "sweep would never end")
    for key, value, optional in (("n_trials", n_trials, timeout is not None), ("n_jobs", n_jobs, False),
                                 ("heartbeat_interval", heartbeat_interval, True),
                                 ("grace_period", grace_period, True)):
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"hydra.sweeper.{key}={value!r} must be an integer >= 1")
    rate = max_failure_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"hydra.sweeper.max_failure_rate={rate!r} must be a number in [0, 1] (the share of "
                          "the study's trials that may fail before the sweep stops)")
    if heartbeat_interval and not grace_period:
        grace_period = 3 * heartbeat_interval
    directions = [direction] if isinstance(direction, str) else list(direction)
    directions = [getattr(d, "name", d).lower() for d in directions]
    if not directions or any(d not in ("minimize", "maximize") for d in directions):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: each direction must be minimize or maximize")
    return Settings(n_trials, None if timeout is None else float(timeout), n_jobs, float(rate), heartbeat_interval,
                    grace_period, directions)


def retry_once(study: optuna.Study, number: int) -> None:
    """Queue an interrupted trial's parameters again, once: the same rule as a trial whose process died."""
    trials = study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == number)
    if RetryHeartbeatStaleTrialCallback.retry_history(frozen):
        return  # itself a retry: its parameters had their second chance
    if any(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number for t in trials):
        return  # already queued
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, frozen)


def register_slurm_launcher(launcher_cfg: DictConfig) -> None:
    """hydra/launcher=slurm's launcher (slurm.py) lives outside the hydra_plugins namespace that Hydra scans: it is
    registered (Hydra's public Plugins.register) when chosen, and only then imported, since it needs the submitit
    plugin. An entry point would make every run without that plugin warn that it cannot be loaded."""
    if OmegaConf.select(launcher_cfg, "_target_") == SLURM_LAUNCHER:
        from . import _slurm as slurm

        Plugins.instance().register(slurm.SlurmLauncher)


def check_cluster(launcher: Any) -> None:
    """A SLURM launcher (Hydra's submitit plugin, or hydra/launcher=slurm's subclass of it) needs a controller
    that answers: asked before the study is opened, so a cluster that is down is one error line and no trial.
    Other launchers need no check; the plugin is not imported for them."""
    plugin = sys.modules.get("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    if plugin is not None and isinstance(launcher, plugin.SlurmLauncher):
        from . import _slurm as slurm

        slurm.check_cluster()


def share_cores(launcher: str, n_jobs: int) -> None:
    """Parallel joblib job processes share the cores: each gets cores // n_jobs OpenMP threads (torch, numpy),
    inherited from this process's environment, unless the user set OMP_NUM_THREADS (local workers get theirs in
    their own environment)."""
    if launcher == "JoblibLauncher":
        os.environ.update(local_workers.thread_env(os.environ, n_jobs, os.cpu_count()))


def budget_text(n_trials: int) -> str:
    """n_trials as a person reads it: 'no limit' when only the timeout ends the sweep."""
    return "no limit" if n_trials >= UNLIMITED else str(n_trials)


def trial_params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.{SIGNIFICANT_DIGITS}g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items())


def trial_end_line(study: optuna.Study, number: int, n_trials: int, metric_names: list[str] | None) -> str:
    """'trial 3 (4/12) COMPLETE val/acc 0.9871 (best so far #1: 0.9890)', 'PRUNED at step 2 ...', 'FAIL: why'
    (a step is what the job reports at: an epoch for mnist_sweep)."""
    names = metric_names or ["value"] * len(study.directions)
    trials = studies.counted_trials(study)
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    done = sum(1 for t in trials if t.state.is_finished())
    head = f"trial {number} ({done}/{budget_text(n_trials)}) {trial.state.name}"
    if trial.state == TrialState.FAIL:
        return f"{head}: {trial.user_attrs.get(FAIL_REASON_ATTR, 'no reason recorded')}"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        head += f" at step {step} {names[0]} {trial.intermediate_values[step]:.4f}"
    elif trial.values:
        head += " " + " ".join(f"{n} {v:.4f}" for n, v in zip(names, trial.values))
    best = results.best_trials(study)
    if len(best) == 1 and len(study.directions) == 1:
        head += f" (best so far #{best[0].number}: {best[0].value:.4f})"
    return head


def quiet_launcher_logs() -> None:
    """Hydra's launchers print each job's full override list (16-digit floats, internal keys); the sweeper's own
    trial lines say the same in a form people read."""
    for name in ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher"):
        logging.getLogger(name).setLevel(logging.WARNING)



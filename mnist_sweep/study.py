"""Optuna studies that resume, prune and survive crashes; no Hydra and no app here (the sweeper plugin and the
app's jobs call this).

The split of work:
- the sweeper process opens the study (`open_study`), fails trials left RUNNING by a dead process, claims
  trials, keeps their heartbeat while they train, and tells their final state;
- each trial's job finds its trial with `current_trial()` and reports its metric per step (`report`) to the
  same storage, so the pruner can stop it, whether the job runs in the sweeper's process or in another one.

Many sweeper processes (workers, on one machine or many) can share one study: they claim trials one at a time
under a lock the storage's database or OS holds (`claim_trials`), so together they run exactly n_trials.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from . import locks
from .redact import mask_secrets
from .errors import ConfigError, one_line

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow parent run, reused on resume
RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow run
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why a trial failed
END_REASON_ATTR = "end_reason"  # trial user attr: why a trial ended early without failing (pruned)
OVERRIDES_ATTR = "overrides"  # trial user attr: the command-line overrides that reproduce the trial
WORKER_ATTR = "worker"  # trial user attr: host:pid of the sweeper process that claimed the trial
# A trial's job finds its trial through environment variables, so the identity crosses into launcher processes
# (joblib, SLURM) without entering the app's config. The storage URL may hold a password: it travels in the
# sweeper process's own environment, which child processes inherit, never through Hydra's saved job config.
STORAGE_ENV = "OPTUNA_SWEEP_STORAGE"  # Optuna storage URL of the study
STUDY_ENV = "OPTUNA_SWEEP_STUDY"  # study name
TRIAL_ENV = "OPTUNA_SWEEP_TRIAL"  # trial number within the study
PRUNER_ENV = "OPTUNA_SWEEP_PRUNER"  # the pruner as JSON: {"_target_": "optuna.pruners.MedianPruner", ...}
DEADLINE_ENV = "OPTUNA_SWEEP_DEADLINE"  # hydra.sweeper.timeout as a Unix time: a job's report past it stops the job
# study user attrs, one per invocation (sweeper process) that ran trials: [start, last seen] in Unix seconds; their
# union is the time the study has spent, which a resumed hydra.sweeper.timeout goes on from
TIME_SPENT_ATTR_PREFIX = "sweep_time:"
# set in the environment of the sweep's local worker processes only (hydra.sweeper.local_workers): JSON of
# local_workers.LocalWorker, {"study": name, "n_trials": budget of this invocation, "report_fd": pipe}
LOCAL_WORKER_ENV = "OPTUNA_SWEEP_LOCAL_WORKER"
PRUNER_TARGETS = "optuna.pruners."  # what PRUNER_ENV may build
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a file name on every OS, no path parts
CONNECT_TIMEOUT_S = 5  # a worker whose database does not answer in this many seconds stops with a clear error

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats, stale-trial retries and the matplotlib plots are "experimental" in Optuna since 2.x; they are what
# this module is built on, so the per-call warnings are noise. Heartbeats with ask/tell are deliberate here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")


def study_name_for(space_name: str, search_space: dict[str, Any], fixed: Sequence[str]) -> str:
    """A stable name from the search space: the same command resumes the same study, another space gets its own."""
    text = json.dumps({"space": {k: repr(v) for k, v in sorted(search_space.items())}, "fixed": sorted(fixed)})
    return f"{space_name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def check_study_name(name: str) -> str:
    """A study name becomes a file name (<study>_best.yaml, <study>.html): letters, digits, '_', '.', '-' only."""
    if not STUDY_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ConfigError(f"study name {name!r} is not allowed: use 1-100 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit (no '/' or '..': the name becomes a file name)")
    return name


@functools.lru_cache(maxsize=8)
def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> RDBStorage:
    """One RDBStorage per URL per process (engine creation is the slow part). With heartbeats (seconds), a
    trial whose process died is failed and retried once instead of staying RUNNING forever.

    Opening it connects and creates the tables, so a database that is down fails here, before any training,
    within CONNECT_TIMEOUT_S."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # seconds to wait for another writer's lock
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    database = locks.sqlite_file(url)
    try:
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:  # a new database gets its tables here: one SQLite writer at a time, PostgreSQL workers retry
                with locks.file_lock(database) if database else nullcontext():
                    beats = {} if not heartbeat_interval else dict(
                        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
                    return RDBStorage(url, engine_kwargs=engine_kwargs, **beats)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(1)  # another worker is creating the same tables
    except Exception as e:
        raise ConfigError(f"Optuna storage {mask_secrets(url)!r} (hydra.sweeper.storage) could not be opened: "
                          f"{one_line(e)}") from None


def open_study(storage: RDBStorage, name: str | None, directions: list[str],
               sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or resume the study, then fail (and re-queue once) trials whose process stopped beating. Pruning is
    the jobs' business (`current_trial`): the sweeper's study never prunes."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                    load_if_exists=True)
    except ValueError as e:  # e.g. resumed with other directions
        raise ConfigError(f"study {name!r}: {e}") from None
    optuna.storages.fail_stale_trials(study)
    return study


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials that failed stale and were re-queued: their retry stands in for them in the budget."""
    numbers = set()
    for t in trials:
        original = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        if original is not None:
            numbers.add(original)
    return numbers


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials less those failed stale and re-queued: their retry stands in for them."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried]


def budget_used(study: optuna.Study) -> int:
    """Trials that count toward n_trials: finished or running (a queued retry counts once it runs)."""
    return sum(1 for t in counted_trials(study) if t.state != TrialState.WAITING)


def failed_count(study: optuna.Study) -> int:
    """Failed trials that count against max_failure_rate."""
    return sum(1 for t in counted_trials(study) if t.state == TrialState.FAIL)


def running_count(study: optuna.Study) -> int:
    """Counted trials still RUNNING, in this worker or another: the budget is not done until they end."""
    return sum(1 for t in counted_trials(study) if t.state == TrialState.RUNNING)


def claim_lock(storage: RDBStorage, study_name: str) -> ContextManager[None]:
    """A lock around 'count the budget, then claim trials', shared by every worker of a study.

    PostgreSQL: an advisory lock; SQLite: a file lock beside the database. Both are released when their holder
    dies, so a SIGKILLed worker cannot block the others. Other databases get no lock (and a warning): there workers
    can overshoot n_trials by a trial or two."""
    url = storage.engine.url
    if url.get_backend_name() == "postgresql":
        return locks.advisory_lock(storage.engine, f"optuna sweep claim {study_name}")
    if url.get_backend_name() == "sqlite":
        database = locks.sqlite_file(url.render_as_string())
        return locks.file_lock(database) if database else nullcontext()
    warnings.warn(f"{url.get_backend_name()} storage: no claim lock, workers may overshoot n_trials")
    return nullcontext()


def trial_id(storage: RDBStorage, study_name: str, number: int) -> int:
    """The storage's id of a trial, through the storage's public lookups."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def claim_trials(study: optuna.Study, storage: RDBStorage, n_trials: int, most: int,
                 before_ask: Callable[[optuna.Study], None],
                 prepare: Callable[[optuna.Trial], None]) -> list[optuna.Trial]:
    """Up to `most` trials of what is left of the study's budget, for this worker.

    Under the claim lock: dead trials are failed (and re-queued, which frees their place in the budget), the
    budget is counted, and each claimed trial gets its first heartbeat and is `prepare`d (its params suggested)
    before the next worker may count. A re-queued trial is claimed before a new one is created. When the sampler
    or `prepare` fails, the trials this call created are told FAIL with the reason: none is left RUNNING."""
    with claim_lock(storage, study.study_name):
        optuna.storages.fail_stale_trials(study)
        room = n_trials - budget_used(study)
        if room <= 0:
            return []
        before_ask(study)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        known = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        batch = []
        try:
            for _ in range(min(most, room)):
                trial = study.ask()
                batch.append(trial)
                if storage.get_heartbeat_interval():
                    storage.record_heartbeat(trial_id(storage, study.study_name, trial.number))
                trial.set_user_attr(WORKER_ATTR, worker)
                prepare(trial)
        except BaseException as e:
            reason = f"the sampler could not propose a trial: {one_line(e)}"
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number not in known:  # created by this call (ask may fail after creating its trial)
                    storage.set_trial_user_attr(trial_id(storage, study.study_name, t.number), FAIL_REASON_ATTR,
                                                reason)
                    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            if isinstance(e, Exception) and not isinstance(e, ConfigError):
                raise ConfigError(f"hydra.sweeper.sampler: {reason}") from None
            raise
        return batch


def fail_running_trials_of(study: optuna.Study, storage: RDBStorage, worker: str, reason: str) -> list[int]:
    """FAIL, with the reason, the RUNNING trials that `worker` (WORKER_ATTR, host:pid) claimed; for a worker known
    to be dead. Returns their numbers. Call it under claim_lock, so no worker counts the budget meanwhile."""
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(WORKER_ATTR) == worker:
            storage.set_trial_user_attr(trial_id(storage, study.study_name, t.number), FAIL_REASON_ATTR, reason)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            numbers.append(t.number)
    return numbers


def suggest(trial: optuna.Trial, distributions: dict[str, optuna.distributions.BaseDistribution]) -> None:
    """Draw every parameter of the space through the trial's public suggest API."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for name, d in distributions.items():
        if isinstance(d, FloatDistribution):
            trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(name, d.choices)
        else:
            raise ConfigError(f"search space: {name} has an unsupported distribution {d!r}")


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


@contextmanager
def heartbeat(storage: RDBStorage, trial_ids: Sequence[int]) -> Iterator[None]:
    """Record the trials' heartbeats while their jobs run (ask/tell gives no heartbeat by itself); nothing when
    the storage has heartbeats off."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # a finished trial, a hiccup of the database: the next beat retries
                    pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reseeded(sampler_seed: int | None, used: int) -> int | None:
    """A resumed study must not replay the random start of the last invocation: offset the seed by the
    number of trials already in the study (deterministic for the same history)."""
    return None if sampler_seed is None else sampler_seed + used


# -- the time budget (hydra.sweeper.timeout) ---------------------------------------------------------------------

def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by the intervals: workers that ran at the same time count their shared time once."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def time_spent(user_attrs: Mapping[str, Any]) -> float:
    """Seconds the study's invocations have run, from their TIME_SPENT_ATTR_PREFIX attrs."""
    return union_seconds([tuple(v) for k, v in user_attrs.items() if k.startswith(TIME_SPENT_ATTR_PREFIX)])


@dataclass(frozen=True)
class SweepClock:
    """One sweeper invocation's share of hydra.sweeper.timeout: when it started, and when it must stop starting
    trials (None: no timeout)."""

    invocation: str  # host:pid:start of the process that records this invocation's time in the study
    started: float  # Unix seconds
    deadline: float | None  # Unix seconds

    @classmethod
    def start(cls, timeout: float | None, spent_before: float, now: float | None = None) -> "SweepClock":
        """What is left of the study's timeout (`spent_before` seconds of it used by earlier invocations)."""
        now = time.time() if now is None else now
        invocation = f"{socket.gethostname()}:{os.getpid()}:{now:.0f}"
        return cls(invocation, now, None if timeout is None else now + timeout - spent_before)

    def past(self, now: float | None = None) -> bool:
        return past(self.deadline, now)

    def record(self, study: optuna.Study) -> None:
        """Note in the study that this invocation has run until now; called as it goes, so a killed one counts."""
        if self.deadline is not None:
            study.set_user_attr(TIME_SPENT_ATTR_PREFIX + self.invocation, [self.started, time.time()])


def past(deadline: float | None, now: float | None = None) -> bool:
    return deadline is not None and (time.time() if now is None else now) >= deadline


@dataclass(frozen=True)
class TrialRef:
    """What a trial's job needs to find its trial; crosses processes as environment variables."""

    storage: str
    study: str
    number: int
    pruner: str = "{}"  # JSON of the pruner's _target_ and arguments; {} never prunes
    deadline: float | None = None  # Unix time at which the sweep's time budget ends; None: no timeout

    def job_env(self) -> dict[str, str]:
        """The per-trial part, set in the job's environment by the launcher (no secret in it)."""
        return {STUDY_ENV: self.study, TRIAL_ENV: str(self.number)}

    def sweep_env(self) -> dict[str, str]:
        """The part shared by every trial of the sweep, set in the sweeper's own environment (the storage URL)."""
        return {STORAGE_ENV: self.storage, PRUNER_ENV: self.pruner,
                DEADLINE_ENV: "" if self.deadline is None else repr(self.deadline)}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TrialRef | None":
        """The trial this process runs, or None outside a sweep."""
        if not env.get(TRIAL_ENV) or not env.get(STORAGE_ENV):
            return None
        return cls(env[STORAGE_ENV], env[STUDY_ENV], int(env[TRIAL_ENV]), env.get(PRUNER_ENV) or "{}",
                   deadline_from_env(env))


def deadline_from_env(env: Mapping[str, str]) -> float | None:
    return float(env[DEADLINE_ENV]) if env.get(DEADLINE_ENV) else None


def build_pruner(spec: str) -> optuna.pruners.BasePruner:
    """A pruner from its JSON spec ({"_target_": "optuna.pruners.X", **arguments}); none: NopPruner."""
    kwargs = json.loads(spec)
    target = kwargs.pop("_target_", None)
    kwargs.pop("_partial_", None)
    if not target:
        return optuna.pruners.NopPruner()
    if not target.startswith(PRUNER_TARGETS):
        raise ConfigError(f"hydra.sweeper.pruner._target_={target!r} is not allowed: use optuna.pruners.*")
    try:
        return getattr(optuna.pruners, target.removeprefix(PRUNER_TARGETS))(**kwargs)
    except (AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"hydra.sweeper.pruner: {target} could not be built: {e}") from None


class TrialReport:
    """A job's link to its trial: `report(value, step)` each epoch (or any step), which raises optuna.TrialPruned
    when the pruner says stop. Multi-objective trials are not pruned (Optuna cannot); they record the values."""

    def __init__(self, ref: TrialRef) -> None:
        storage = make_storage(ref.storage)  # reports only: the sweeper keeps the heartbeat
        study = optuna.load_study(study_name=ref.study, storage=storage, pruner=build_pruner(ref.pruner))
        self.trial = optuna.trial.Trial(study, trial_id(storage, ref.study, ref.number))
        self.number = ref.number
        self.study = ref.study
        self.deadline = ref.deadline
        self.multi_objective = len(study.directions) > 1

    def report(self, value: float, step: int, last: bool = False) -> None:
        """`last`: the job's final step is recorded but never pruned: the work is done, and a pruner that judges
        every step (successive halving has a rung at 9 epochs of a 9-epoch trial) would throw a finished result
        away as PRUNED."""
        if self.multi_objective:
            self.trial.set_user_attr(f"step_{step}", value)
        else:
            self.trial.report(value, step=step)
            if not last and self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: value {value:.4g}")
        if not last and past(self.deadline):
            raise optuna.TrialPruned(f"stopped at step {step} (value {value:.4g}): the sweep's time budget "
                                     "(hydra.sweeper.timeout) ran out")

    def set_user_attr(self, key: str, value: Any) -> None:
        self.trial.set_user_attr(key, value)


class NoTrial:
    """Outside a sweep: reports go nowhere, so the same code runs alone and as a trial."""

    number = None
    study = None

    def report(self, value: float, step: int, last: bool = False) -> None:
        pass

    def set_user_attr(self, key: str, value: Any) -> None:
        pass


def current_trial(env: Mapping[str, str] | None = None) -> TrialReport | NoTrial:
    """The trial this process runs for the sweeper (`hydra/sweeper=optuna_pruning`), or a no-op outside a sweep.

        trial = current_trial()
        for epoch in range(1, epochs + 1):
            ...
            trial.report(val_acc, step=epoch)  # raises optuna.TrialPruned when the pruner says stop
    """
    ref = TrialRef.from_env(os.environ if env is None else env)
    return NoTrial() if ref is None else _trial_report(ref)


@functools.lru_cache(maxsize=4)
def _trial_report(ref: TrialRef) -> TrialReport:
    return TrialReport(ref)  # one per trial per process: loading the study is a database round trip

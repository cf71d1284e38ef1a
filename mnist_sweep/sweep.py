"""Optuna studies that resume, prune and survive crashes; no Hydra here (the sweeper plugin calls this).

The split of work:
- the sweeper process opens the study (`open_study`), fails trials left RUNNING by a dead process, asks for
  trials, keeps their heartbeat while they train, and tells their final state;
- each trial's job reports its validation metric per epoch (`TrialReporter`) to the same storage, so the
  pruner can stop it, whether the job runs in the sweeper's process or in another one.

Many sweeper processes (workers, on one machine or many) can share one study: they claim trials one at a time
under a lock the storage's database or OS holds (`claim_trials`), so together they run exactly n_trials.
"""

from __future__ import annotations

import functools
import hashlib
import json
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
from .errors import ConfigError
from .train import METRIC_DIRECTIONS

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow parent run, reused on resume
RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow run
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why a trial failed
OVERRIDES_ATTR = "overrides"  # trial user attr: the command-line overrides that reproduce the trial
WORKER_ATTR = "worker"  # trial user attr: host:pid of the sweeper process that claimed the trial
# A trial's job finds its trial through environment variables, so the identity crosses into launcher processes
# (joblib, SLURM) without entering the app's config. The storage URL may hold a password: it travels in the
# sweeper process's own environment, which child processes inherit, never through Hydra's saved job config.
STORAGE_ENV = "MNIST_SWEEP_STORAGE"  # Optuna storage URL of the study
STUDY_ENV = "MNIST_SWEEP_STUDY"  # study name
TRIAL_ENV = "MNIST_SWEEP_TRIAL"  # trial number within the study
PARENT_RUN_ENV = "MNIST_SWEEP_PARENT_RUN"  # the study's MLflow run, which the trial's run nests under
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a file name on every OS, no path parts
CONNECT_TIMEOUT_S = 5  # a worker whose database does not answer in this many seconds stops with a clear error

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats, stale-trial retries and the matplotlib plots are "experimental" in Optuna since 2.x; they are what
# this module is built on, so the per-call warnings are noise. Heartbeats with ask/tell are deliberate here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")


def directions_for(metrics: Sequence[str]) -> list[str]:
    """'maximize'/'minimize' for each optimized metric: the direction follows from the metric."""
    return [METRIC_DIRECTIONS[m] for m in metrics]


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


def shown_url(url: str) -> str:
    """The URL as messages may show it: the password masked."""
    return mask_secrets(url)


@functools.lru_cache(maxsize=8)
def make_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 30) -> RDBStorage:
    """One RDBStorage per URL per process (engine creation is the slow part), with heartbeats so that a
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
                    return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(1)  # another worker is creating the same tables
    except Exception as e:
        raise ConfigError(f"Optuna storage {shown_url(url)!r} (hydra.sweeper.storage) could not be opened: "
                          f"{first_line(e)}") from None


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (drivers add pages of context)."""
    if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__  # Optuna's wrapper of the database's error says less than the error itself
    text = str(getattr(e, "orig", None) or e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def open_study(storage: RDBStorage, name: str, directions: list[str], sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create or resume the study, then fail (and re-queue once) trials whose process stopped beating."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=directions, load_if_exists=True)
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

    PostgreSQL: an advisory lock; SQLite: a file lock beside the database (flock on Unix). Both are released when
    their holder dies, so a SIGKILLed worker cannot block the others. Other databases get no lock (and a warning):
    there workers can overshoot n_trials by a trial or two."""
    storage = getattr(storage, "_backend", storage)  # a study's storage is Optuna's cache over the RDBStorage
    url = storage.engine.url
    if url.get_backend_name() == "postgresql":
        return locks.advisory_lock(storage.engine, f"mnist_sweep claim {study_name}")
    if url.get_backend_name() == "sqlite":
        database = locks.sqlite_file(url.render_as_string())
        return locks.file_lock(database) if database else nullcontext()
    warnings.warn(f"{url.get_backend_name()} storage: no claim lock, workers may overshoot n_trials")
    return nullcontext()


def claim_trials(study: optuna.Study, n_trials: int, most: int, before_ask: Callable[[optuna.Study], None],
                 prepare: Callable[[optuna.Trial], None]) -> list[optuna.Trial]:
    """Up to `most` trials of what is left of the study's budget, for this worker.

    Under the claim lock: dead trials are failed (and re-queued, which frees their place in the budget), the
    budget is counted, and each claimed trial gets its first heartbeat and is `prepare`d (its params suggested)
    before the next worker may count. A re-queued trial is claimed before a new one is created. When the sampler
    or `prepare` fails, the trials this call created are told FAIL with the reason: none is left RUNNING."""
    with claim_lock(study._storage, study.study_name):
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
                study._storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr(WORKER_ATTR, worker)
                prepare(trial)
        except BaseException as e:
            reason = f"the sampler could not propose a trial: {first_line(e)}"
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number not in known:  # created by this call (ask may fail after creating its trial)
                    study._storage.set_trial_user_attr(t._trial_id, FAIL_REASON_ATTR, reason)
                    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            if isinstance(e, Exception) and not isinstance(e, ConfigError):
                raise ConfigError(f"hydra.sweeper.sampler: {reason}") from None
            raise
        return batch


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
    """Record the trials' heartbeats while their jobs run (ask/tell gives no heartbeat by itself)."""
    stop = threading.Event()
    interval = storage.get_heartbeat_interval() or 10

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


@dataclass(frozen=True)
class TrialRef:
    """What a trial's job needs to find its trial and its MLflow parent; crosses processes as environment
    variables (`as_env`, `from_env`)."""

    storage: str
    study: str
    number: int
    parent_run_id: str | None = None

    def job_env(self) -> dict[str, str]:
        """The per-trial part, set in the job's environment by the launcher (no secret in it)."""
        return {STUDY_ENV: self.study, TRIAL_ENV: str(self.number), PARENT_RUN_ENV: self.parent_run_id or ""}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TrialRef | None":
        """The trial this process runs, or None outside a sweep."""
        if not env.get(TRIAL_ENV) or not env.get(STORAGE_ENV):
            return None
        return cls(env[STORAGE_ENV], env[STUDY_ENV], int(env[TRIAL_ENV]), env.get(PARENT_RUN_ENV) or None)


class TrialReporter:
    """Reports a job's per-epoch metric to its Optuna trial and raises optuna.TrialPruned when the pruner says
    stop. Multi-objective trials are not pruned (Optuna does not support it); they only record values."""

    def __init__(self, ref: TrialRef, pruner: optuna.pruners.BasePruner, metric: str, multi_objective: bool):
        storage = make_storage(ref.storage)  # reports only: the sweeper keeps the heartbeat
        study = optuna.load_study(study_name=ref.study, storage=storage, pruner=pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, ref.number)
        self.trial = optuna.trial.Trial(study, trial_id)
        self.metric = metric
        self.multi_objective = multi_objective
        self.last_epoch = 0

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.last_epoch = epoch
        if self.multi_objective:
            self.trial.set_user_attr(f"epoch_{epoch}/{self.metric}", metrics[self.metric])
            return
        self.trial.report(metrics[self.metric], step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric}={metrics[self.metric]:.4f}")


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto front; empty when nothing completed."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def results_summary(study: optuna.Study) -> dict[str, Any]:
    """optimization_results.yaml, in the shape the hydra-optuna-sweeper plugin writes it."""
    best = best_trials(study)
    if len(study.directions) > 1:
        return {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in best]}
    if not best:
        return {"name": "optuna", "best_params": {}, "best_value": None}
    return {"name": "optuna", "best_params": best[0].params, "best_value": best[0].value}


def experiment_yaml(choices: dict[str, str], values: dict[str, Any], comment: str) -> str:
    """A `# @package _global_` experiment config that reproduces a trial: group choices ({'optimizer': 'adamw'})
    go into the defaults list, values ({'model.dropout': 0.3}, already unescaped Python values) into the body."""
    import yaml

    body: dict[str, Any] = {}
    for key, value in values.items():
        node = body
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    lines = ["# @package _global_", f"# {comment}"]
    if choices:
        lines += ["defaults:"] + [f"  - override /{k}: {v}" for k, v in choices.items()]
    text = yaml.safe_dump(body, sort_keys=True).strip() if body else ""
    return "\n".join(lines + ([text] if text else [])) + "\n"


def history_figures(study: optuna.Study) -> dict[str, Any]:
    """Optuna's own matplotlib plots, as {artifact name: figure}; plots that need more trials are skipped."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        return {}
    from optuna.visualization import matplotlib as ovm

    if len(study.directions) == 1:
        plots = {"optimization_history.png": ovm.plot_optimization_history}
        if len(completed) >= 2:
            plots["param_importances.png"] = ovm.plot_param_importances
    elif len(study.directions) <= 3:  # Optuna draws Pareto fronts of 2 or 3 objectives
        plots = {"pareto_front.png": ovm.plot_pareto_front}
    else:
        plots = {}
    return optuna_figures(study, plots)


def optuna_figures(study: optuna.Study, plots: dict[str, Any], size: tuple[float, float] = (8, 5)) -> dict[str, Any]:
    """{name: plot function of optuna.visualization.matplotlib} -> {name: figure}; a plot that cannot be drawn
    (too few distinct values for importances, and the like) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, Any] = {}
    with matplotlib.rc_context():  # Optuna's plots switch the process to ggplot style: keep it to them
        for name, plot in plots.items():
            try:
                ax = plot(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(*size)
                fig.tight_layout()
                figures[name] = fig
                plt.close(fig)
            except Exception:
                continue
    return figures

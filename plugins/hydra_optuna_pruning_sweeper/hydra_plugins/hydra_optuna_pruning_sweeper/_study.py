"""Optuna studies that resume, prune and survive crashes; no Hydra and no app here (the sweeper plugin and the
app's jobs call this).

The split of work:
- the sweeper process opens the study (`open_study`), claims trials, keeps their heartbeat while they train,
  and tells their final state (trials a dead process left RUNNING are _recovery.py's);
- each trial's job finds its trial with `current_trial()` and reports its metric per step (`report`) to the
  same storage, so the pruner can stop it, whether the job runs in the sweeper's process or in another one.

Many sweeper processes (workers, on one machine or many) can share one study: they claim trials one at a time
under a lock the storage's database or OS holds (`claim_trials`), so together they run exactly n_trials.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from pathlib import Path
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from . import _locks as locks
from ._errors import ConfigError, one_line
from ._names import END_REASON_ATTR, FAIL_REASON_ATTR, WITHDRAWN_ATTR, WORKER_ATTR, WORKER_PIDS_ATTR
from ._optuna_adapter import engine, heartbeat_interval, record_heartbeat, retried_trial_number, set_trial_user_attr, \
    stale_trial_retry, trial_id
from ._outage import LockLost, is_full, is_restart, is_transient
from ._redact import mask_secrets

log = logging.getLogger("optuna_pruning")
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a file name on every OS, no path parts
CONNECT_TIMEOUT_S = 5  # a worker whose database does not answer in this many seconds stops with a clear error
RESTART_WAIT_S = 60  # seconds a worker that starts while its database restarts (or is full) waits for it
POOL_SIZE = 1  # connections a process keeps open on a server database: its queries, its heartbeat's, its jobs'
# reports and the claim lock's session (_locks.advisory_lock) share it, one at a time
MAX_OVERFLOW = 0  # never a second: a heartbeat that overlaps a job's report waits milliseconds for the one
_OPENED: dict[str, RDBStorage] = {}  # the storage each URL was last opened as in this process (report_storage)


def quiet_optuna() -> None:
    """Called when a sweep or a trial's job starts (never at import: an app that only imports the plugin keeps its
    own warnings). Heartbeats, stale-trial retries and the matplotlib plots are "experimental" in Optuna since 2.x;
    they are what the sweeper is built on, so their per-call warnings are noise. Heartbeats with ask/tell are
    deliberate here. Optuna's per-trial INFO lines are replaced by the sweeper's own."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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

    Opening it connects and creates the tables, so a database that is down (or a wrong URL) fails here, before
    any training, within CONNECT_TIMEOUT_S. One that is restarting (it says so, or ends the connection) is waited
    for up to RESTART_WAIT_S: a worker that starts while the others ride out a restart joins them. So is one
    that PostgreSQL refuses for max_connections (other clients leave), with one line; after the wait it stops
    with one line that says how many connections a worker holds."""
    # No ping before each use: a connection that a restart ended fails its next query, which the outage handling
    # (_outage.py) retries on a new one; a ping per checkout doubled a worker's round trips
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": False, "pool_size": POOL_SIZE,
                                      "max_overflow": MAX_OVERFLOW}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # seconds to wait for another writer's lock
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    database = locks.sqlite_file(url)
    try:
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        restart_ends = time.monotonic() + RESTART_WAIT_S
        attempt, said_full = 0, False
        while True:
            try:  # a new database gets its tables here: one SQLite writer at a time, PostgreSQL workers retry
                with locks.file_lock(database) if database else nullcontext():
                    beats = {} if not heartbeat_interval else dict(
                        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        heartbeat_stale_trial_callback=stale_trial_retry())
                    if database is None:  # a server: its tables first, on connections of their own
                        made = RDBStorage(url, engine_kwargs={"connect_args": engine_kwargs.get("connect_args", {}),
                                                              "poolclass": sqlalchemy.pool.NullPool},
                                          skip_compatibility_check=True)
                        engine(made).dispose()  # Optuna holds two connections where it makes them
                    storage = RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=True, **beats)
                    check_schema(storage)
                    _OPENED[url] = storage
                    return storage
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                attempt += 1
                if attempt == 3:
                    raise
                time.sleep(1)  # another worker is creating the same tables
            except Exception as e:
                if not (is_restart(e) or is_full(e)) or time.monotonic() > restart_ends:
                    raise
                if is_full(e) and not said_full:
                    said_full = True
                    log.warning(f"the Optuna storage {mask_secrets(url)} has no free connection (PostgreSQL's "
                                f"max_connections): waiting up to {RESTART_WAIT_S} s for one")
                time.sleep(1)
    except Exception as e:
        hint = (f" PostgreSQL's max_connections is reached: each sweeper process (a worker) holds "
                f"{POOL_SIZE} connection, so N workers need N. Raise "
                "max_connections (postgresql.conf), run fewer workers, or put a pooler (PgBouncer) in front."
                ) if is_full(e) else ""
        raise ConfigError(f"Optuna storage {mask_secrets(url)!r} (hydra.sweeper.storage) could not be opened: "
                          f"{one_line(e)}{hint}") from e  # the cause tells a job whether to wait (_trial.TrialReport)


def check_schema(storage: RDBStorage) -> None:
    """Optuna's check that the database's tables are of this Optuna's schema, made here one connection at a time:
    Optuna's own, when the storage opens, holds two, and a worker's pool has one."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current != head:
        raise RuntimeError(f"its tables have Optuna's schema {current} and this Optuna ({optuna.__version__}) "
                           f"uses {head}: upgrade them with `optuna storage upgrade --storage URL`, or sweep with "
                           "the Optuna version that made them")


def report_storage(url: str) -> RDBStorage:
    """The storage a trial's job reports through: where the job runs in its sweeper's process (the basic
    launcher, a local worker), the sweeper's own, so that a worker holds one pool of connections, not two."""
    return _OPENED.get(url) or make_storage(url)


def open_study(storage: RDBStorage, name: str | None, directions: list[str],
               sampler: optuna.samplers.BaseSampler, fresh: bool = False) -> optuna.Study:
    """Create or resume the study. `fresh`: always a new study; where the storage already holds one of that name
    (a sweep folder used again), the first free `<name>-<n>`. Pruning is the jobs' business (`current_trial`):
    the sweeper's study never prunes."""
    for n in range(1, 10_000):
        candidate = name if n == 1 or name is None else f"{name}-{n}"
        try:
            return optuna.create_study(study_name=candidate, storage=storage, sampler=sampler,
                                       directions=directions, load_if_exists=not fresh)
        except optuna.exceptions.DuplicatedStudyError:  # only when fresh: that name is an earlier invocation's
            continue
        except ValueError as e:  # e.g. resumed with other directions
            raise ConfigError(f"study {name!r}: {e}") from None
    raise ConfigError(f"study {name!r}: no free name {name}-<n> left in the storage")


def check_objectives(study: optuna.Study, directions: list[str], metric_names: list[str] | None) -> None:
    """A study's objectives are fixed once it exists: resumed with another direction or metric, its old and new
    values would be ranked together (loss values in an accuracy study, the wrong trial called best). Optuna resumes
    such a study without a word, so it is refused here, naming what the study optimizes and what was asked."""
    had = [d.name.lower() for d in study.directions]
    named = study.metric_names
    if had == directions and (not named or not metric_names or list(named) == list(metric_names)):
        return

    def shown(names: list[str] | None, dirs: list[str]) -> str:
        return ", ".join(f"{n} ({d})" if n else d for n, d in zip(names or [None] * len(dirs), dirs))

    raise ConfigError(f"study {study.study_name!r} optimizes {shown(named, had)}; this sweep asks for "
                      f"{shown(metric_names, directions)}: a study's objective is fixed once it exists. Sweep "
                      "the study's own metric again, or start another study (hydra.sweeper.study_name=...)")


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials that failed stale and were re-queued: their retry stands in for them in the budget."""
    numbers = set()
    for t in trials:
        original = retried_trial_number(t)
        if original is not None:
            numbers.add(original)
    return numbers


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials less those failed stale and re-queued (their retry stands in for them) and the claims withdrawn
    before they ran."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried and WITHDRAWN_ATTR not in t.user_attrs]


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that count (`counted`)."""
    return counted(study.get_trials(deepcopy=False))


@dataclass(frozen=True)
class Tally:
    """One read of a study, counted the budget's way. A read costs a query that loads every unfinished trial
    (Optuna's cache keeps only finished ones), so with many workers each step of a trial's life reads once and
    counts everything it needs from that read."""

    size: int  # trials in the study, retried and withdrawn ones included
    used: int  # counted trials finished or running: the n_trials budget (a queued retry counts once it runs)
    failed: int  # counted FAIL trials: what max_failure_rate judges
    running: int  # counted RUNNING trials, in this worker or another: the budget is not done until they end


def tally(trials: Sequence[FrozenTrial]) -> Tally:
    states = [t.state for t in counted(trials)]
    return Tally(size=len(trials), used=sum(1 for s in states if s != TrialState.WAITING),
                 failed=states.count(TrialState.FAIL), running=states.count(TrialState.RUNNING))


def read_tally(study: optuna.Study) -> Tally:
    return tally(study.get_trials(deepcopy=False))


def budget_used(study: optuna.Study) -> int:
    """Trials that count toward n_trials: finished or running."""
    return read_tally(study).used


@contextmanager
def claim_lock(storage: RDBStorage, study_name: str) -> Iterator[Callable[[], bool]]:
    """A lock around 'count the budget, then claim trials', shared by every worker of a study; yields a check of
    whether it is still held (_locks.advisory_lock).

    PostgreSQL: an advisory lock; SQLite: a file lock beside the database. Both are released when their holder
    dies, so a SIGKILLed worker cannot block the others. Other databases get no lock (and a warning): there workers
    can overshoot n_trials by a trial or two."""
    url = engine(storage).url
    database = locks.sqlite_file(url.render_as_string()) if url.get_backend_name() == "sqlite" else None
    if url.get_backend_name() == "postgresql":
        with locks.advisory_lock(engine(storage), f"optuna sweep claim {study_name}") as still_held:
            yield still_held
        return
    if url.get_backend_name() != "sqlite":  # PostgreSQL returned above
        warnings.warn(f"{url.get_backend_name()} storage: no claim lock, workers may overshoot n_trials")
    with locks.file_lock(database) if database else nullcontext():
        yield locks.always_held


def claim_trials(study: optuna.Study, storage: RDBStorage, n_trials: int, most: int,
                 recover: Callable[[Sequence[FrozenTrial]], bool],
                 suggest: Callable[[optuna.Trial], None]) -> list[optuna.Trial]:
    """Up to `most` trials of what is left of the study's budget, for this worker.

    Under the claim lock, and nothing else under it, from one read of the study: claims that were cut off are
    withdrawn, `recover` (the caller fails dead trials there, which re-queues them and frees their place in the
    budget; it says whether it failed any), the budget is counted, and each claimed trial is created (`ask`: a
    grid point or a relative sampler's proposal is chosen there), gets its first heartbeat and, last, this
    worker's name, before the next worker may count. A re-queued trial is claimed before a new one is created.
    Its parameters (`suggest`) are drawn after the lock is released: an independent sampler such as TPE reads
    the whole study for them, and the other workers need not wait for that.

    A RUNNING trial without a worker's name, seen under the lock, is a claim cut off (its process died, or lost
    the database, in the middle of it): it never ran, and it is withdrawn (FAIL, WITHDRAWN_ATTR, out of the
    budget). When this call fails, or finds that the database ended its lock meanwhile (a restart: another worker
    may have counted the same room), its own trials are withdrawn the same way and the error raised (_outage.py
    decides whether to claim again)."""
    with claim_lock(storage, study.study_name) as still_held:
        trials = study.get_trials(deepcopy=False)
        if withdraw_cut_off_claims(study, storage, trials) | recover(trials):
            trials = study.get_trials(deepcopy=False)  # rare: count what they freed
        room = n_trials - tally(trials).used
        if room <= 0:
            return []
        worker, pids = f"{socket.gethostname()}:{os.getpid()}", pid_namespace()
        batch = []
        try:
            for _ in range(min(most, room)):
                trial = study.ask()
                batch.append(trial)
                if heartbeat_interval(storage):
                    record_heartbeat(storage, trial_id(storage, study.study_name, trial.number))
                if pids:
                    trial.set_user_attr(WORKER_PIDS_ATTR, pids)
                trial.set_user_attr(WORKER_ATTR, worker)  # the claim is made
            if not still_held():
                raise LockLost(f"the claim lock of study {study.study_name!r} ended while it was held")
        except BaseException as e:
            _give_back(study, storage, batch, e, still_held, locked=True)
    try:
        for trial in batch:
            suggest(trial)
    except BaseException as e:
        _give_back(study, storage, batch, e, locked=False)
    return batch


def _give_back(study: optuna.Study, storage: RDBStorage, batch: list[optuna.Trial], error: BaseException,
               still_held: Callable[[], bool] = locks.always_held, locked: bool = False) -> None:
    """A claim that failed: its trials are withdrawn and the error raised, as LockLost where the database (not
    the sampler) cut it off, as ConfigError where the sampler could not propose a trial. `locked`: still under
    the claim lock, where a trial that ask() made before it failed (it has no worker's name yet) is withdrawn
    too; after the lock, another worker's claim in the making looks the same, so only this claim's own are."""
    # the database, not the sampler: it went away, or restarted and ended the lock (another worker, with the
    # lock, may then have withdrawn this claim's trial under it: "Trial#N has already finished")
    lost = isinstance(error, Exception) and (is_transient(error) or not still_held())
    reason = f"{'its claim was cut off' if lost else 'the sampler could not propose a trial'}: {one_line(error)}"
    try:
        for trial in batch:
            withdraw(study, storage, trial.number, reason)
        if locked:
            withdraw_cut_off_claims(study, storage)
    except Exception:  # the database is gone: the next claim withdraws them (WITHDRAWN_ATTR or no name), or
        pass  # their heartbeat goes stale and they run again
    if lost and not is_transient(error):
        raise LockLost(reason) from error
    if isinstance(error, Exception) and not isinstance(error, ConfigError) and not lost:
        raise ConfigError(f"hydra.sweeper.sampler: {reason}") from None
    raise error


def withdraw_cut_off_claims(study: optuna.Study, storage: RDBStorage,
                            trials: Sequence[FrozenTrial] | None = None) -> bool:
    """Under the claim lock: withdraw the RUNNING trials that carry no worker's name (claims cut off) and those
    whose withdrawal was cut off; `trials`: a read of the study made under the lock. Whether it withdrew any."""
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    cut_off = [t for t in trials if t.state == TrialState.RUNNING
               and (WORKER_ATTR not in t.user_attrs or WITHDRAWN_ATTR in t.user_attrs)]
    for t in cut_off:
        withdraw(study, storage, t.number, t.user_attrs.get(WITHDRAWN_ATTR)
                 or "its claim was cut off before it ran (its process died or lost the database)")
    return bool(cut_off)


def withdraw(study: optuna.Study, storage: RDBStorage, number: int, reason: str) -> None:
    """A claimed trial that never ran leaves the study's budget: FAIL, with why in WITHDRAWN_ATTR."""
    try:
        set_trial_user_attr(storage, study.study_name, number, WITHDRAWN_ATTR, mask_secrets(reason)[:2000])
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # withdrawn meanwhile (by its own claimer, when a restart had ended the lock) or told: nothing to do
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def pid_namespace() -> str | None:
    """This process's host and PID namespace, where a pid names one process; None where /proc does not say."""
    try:
        return f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_gone(pid: int) -> bool:
    """Whether no process (or only the zombie of one) has this pid in this PID namespace."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        return True
    except OSError:  # another user's process, or no /proc: taken to live
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def fail_by_number(study: optuna.Study, storage: RDBStorage, number: int, reason: str) -> None:
    """FAIL a RUNNING trial this process holds no Trial object for (one whose process died, or one the sampler
    left half made), with the reason as its user attr."""
    set_trial_user_attr(storage, study.study_name, number, FAIL_REASON_ATTR, reason)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None = None,
         reason: str | None = None) -> None:
    """Tell the trial's end to the study, with why it failed or ended early (a user attr, masked)."""
    if reason:
        trial.set_user_attr(FAIL_REASON_ATTR if state == TrialState.FAIL else END_REASON_ATTR,
                            mask_secrets(reason)[:2000])
    try:
        study.tell(trial, values=values, state=state, skip_if_finished=True)
    except RuntimeError as e:  # GridSampler calls study.stop() on its last point; the state is stored
        if "Study.stop" not in str(e):
            raise


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
def heartbeat(storage: RDBStorage, trial_ids: Sequence[int],
              on_error: Callable[[Exception], None] = lambda e: None) -> Iterator[None]:
    """Record the trials' heartbeats while their jobs run (ask/tell gives no heartbeat by itself); nothing when
    the storage has heartbeats off. A beat that fails is told to `on_error` and tried again at the next one."""
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for beating in trial_ids:
                try:
                    record_heartbeat(storage, beating)
                except Exception as e:  # a finished trial, a hiccup of the database: the next beat retries
                    on_error(e)
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

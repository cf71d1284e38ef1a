"""MLflow records of a sweep: the study's parent run and one child run per trial, made by the sweeper, which
the job (any app) logs into. MLflow itself is imported only when a tracking URI is set (the `[mlflow]` extra).

Uses an explicit MlflowClient (no fluent active-run state), so many runs in one process don't interfere and every
run is ended with a status even when training dies: FINISHED, FAILED, or KILLED on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

from ._errors import ConfigError, UserError, one_line
from ._locks import file_lock, sqlite_file
from ._names import END_REASON_TAG, PARENT_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG

CONNECT_TIMEOUT_S = 5  # seconds to wait for a tracking server before giving up with a clear error


@functools.lru_cache(maxsize=8)
def make_client(tracking_uri: str):
    """One client per URI per process: opening a store checks the database schema, which takes a second.

    A tracking server (http URI) must answer first: MLflow's own client retries for minutes before it gives up."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)
    database = sqlite_file(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri=tracking_uri)
    try:  # making the client creates the tables: two sweeps started at once on one file must not race
        database.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(database):
            return MlflowClient(tracking_uri=tracking_uri)
    except Exception as e:
        raise ConfigError(f"MLflow tracking store {tracking_uri!r} (mlflow.tracking_uri) could not be opened: "
                          f"{one_line(e)}") from None


def existing_client(tracking_uri: str, option: str = "--tracking-uri"):
    """make_client for commands that read what a sweep recorded: a missing SQLite store is a UserError (MLflow
    would create an empty one and then fail on the first run it looks up)."""
    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        raise UserError(f"{option} {tracking_uri}: no MLflow store there ({database.absolute()} does not exist); "
                        f"run this where the sweep ran, or pass {option} with the sweep's mlflow.tracking_uri")
    if tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri, key=option)
    return make_client(tracking_uri)


def check_server(uri: str, timeout: float = CONNECT_TIMEOUT_S, key: str = "mlflow.tracking_uri") -> None:
    """Raise ConfigError unless something answers HTTP at `uri` (any status: a proxy may hide /health); `key`:
    the setting or option the URI came from."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow tracking server {uri!r} ({key}) cannot be reached: {reason}; "
                          "start it (mlflow server ...) or fix the URI") from None


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by a parallel worker, or a failed write (a lock): raise that
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


LOCK_WAIT_S = 60.0  # seconds a write waits in all for another process's lock on a SQLite store (as Optuna's does)
_LOCKED = "database is locked"
_FULL = "database or disk is full"  # what SQLite says when a write finds no space
T = TypeVar("T")


class _DropLockedErrors(logging.Filter):
    """MLflow logs a traceback for every failed attempt; the ones retried or reported here are not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and any(known in str(record.exc_info[1]) for known in (_LOCKED, _FULL)))


def retry_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """call(*args, **kwargs), again with backoff while a SQLite store answers "database is locked": another
    process holds its lock longer than the 20 s MLflow waits per attempt. After LOCK_WAIT_S, a UserError."""
    deadline = time.monotonic() + LOCK_WAIT_S
    delay = 0.1
    quiet = _DropLockedErrors()
    mlflow_db_log = logging.getLogger("mlflow.store.db.utils")
    mlflow_db_log.addFilter(quiet)
    try:
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as e:
                if _FULL in str(e):  # SQLite's word for a full disk (or quota) under the store
                    raise UserError(f"the MLflow tracking store (mlflow.tracking_uri) has no space left: {_FULL}; "
                                    "free space on its disk, or point mlflow.tracking_uri at another one, and run "
                                    "again") from None
                if _LOCKED not in str(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise UserError(f"the MLflow tracking store (mlflow.tracking_uri) stayed locked by another "
                                    f"process for {LOCK_WAIT_S:g} s ({_LOCKED}); stop the other writer (an open "
                                    "sqlite3 shell, a stuck process) and run again") from None
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
    finally:
        mlflow_db_log.removeFilter(quiet)


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file over a size limit, quota exceeded


@contextlib.contextmanager
def disk_space(folder: Callable[[], str], what: str) -> Iterator[None]:
    """A full disk (or quota) while writing `what` becomes one UserError naming the folder (folder() is asked
    only then) instead of the writer's traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise UserError(f"no space left to save {what} in {folder()} ({e.strerror}); free space there and run "
                        "again") from None


class RunRecorder:
    """One MLflow run. As a context manager it ends the run FINISHED, KILLED (Ctrl-C) or FAILED (any error)."""

    def __init__(self, client, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, finished_on: tuple[type, ...] = (),
                 run_id: str | None = None) -> None:
        """A new run in `experiment`, or, with `run_id`, the run a sweeper made for this trial (which keeps its
        name, experiment and nesting)."""
        self.client = client
        self.finished_on = finished_on  # exceptions that end the run FINISHED (a pruned trial), not FAILED
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        if run_id:
            run = retry_locked(client.get_run, run_id)
        else:
            run = retry_locked(lambda: client.create_run(experiment_id(client, experiment), run_name=run_name,
                                                        tags=all_tags))
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        if run_id:
            self.set_tags(all_tags)

    @classmethod
    def attach(cls, client, run_id: str) -> "RunRecorder":
        """Log to an existing run without changing its status (a study's parent run, while the sweep ends it)."""
        rec = cls.__new__(cls)
        run = client.get_run(run_id)
        rec.client, rec.run_id, rec.experiment_id, rec.finished_on = client, run_id, run.info.experiment_id, ()
        return rec

    @classmethod
    def resume(cls, client, run_id: str) -> "RunRecorder":
        """Reopen a run (a study's parent run on resume): RUNNING again until it is ended."""
        rec = cls.attach(client, run_id)
        retry_locked(client.update_run, run_id, status="RUNNING")
        return rec

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or issubclass(exc_type, self.finished_on):
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        if exc is not None:
            self.set_tags({END_REASON_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
        retry_locked(self.client.set_terminated, self.run_id, status=status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            retry_locked(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        finite = [Metric(k, float(v), ts, step) for k, v in metrics.items() if math.isfinite(float(v))]
        retry_locked(self.client.log_batch, self.run_id, metrics=finite)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry_locked(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact_location(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_text(self, text: str, artifact_file: str) -> None:
        with disk_space(self.artifact_location, artifact_file):
            retry_locked(self.client.log_text, self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        with disk_space(self.artifact_location, artifact_file):
            retry_locked(self.client.log_figure, self.run_id, figure, artifact_file)



def source_tags(app: str) -> dict[str, str]:
    """MLflow's source tags of a run started by the app `app` (its Hydra job name) from a shell."""
    return {SOURCE_NAME_TAG: app, SOURCE_TYPE_TAG: "LOCAL"}


def child_runs(client, parent_run_id: str, status: str | None = None) -> list:
    """The runs nested under `parent_run_id` (optionally only those with `status`)."""
    parent = client.get_run(parent_run_id)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

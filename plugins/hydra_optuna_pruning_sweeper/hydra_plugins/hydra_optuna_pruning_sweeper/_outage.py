"""Riding out a storage that is briefly gone: a PostgreSQL restart or failover, a network blip. A study that runs
for a day should not lose its workers to a database that is back 20 seconds later.

Once the study is open (a wrong URL still fails at once: _study.make_storage), each step of the trial loop that
talks to the storage runs through `Outage.call`: when the connection is lost, the step is retried with backoff
(0.5 s, doubling, at most 10 s apart) for up to `hydra.sweeper.storage_wait` seconds, with one warning line per
outage. After that wait the error goes on to the sweeper, which stops with its one line ("finished trials are
kept, run the same command again to resume").

Each retried step is one the storage can take twice: a claim starts over (the trials of a claim that was cut
off are withdrawn by the next one, _study.claim_trials), telling a trial's end skips a trial already told, and
a report writes the same step's value again.

Outages also age every heartbeat: nobody can beat while the database is gone. A worker that has just ridden one
out gives the others `grace_period` seconds to beat again before it fails their trials as dead (`recent`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable, Iterator, TypeVar

from ._errors import one_line
from ._redact import mask_secrets

log = logging.getLogger("optuna_pruning")
T = TypeVar("T")
FIRST_DELAY_S = 0.5  # the first retry's wait; it doubles on each failure
MAX_DELAY_S = 10.0  # the most seconds between two retries
SAME_OUTAGE_S = 10.0  # a storage that answers for less than this between failures (shutting down) is one outage

# SQLSTATEs of a lost or refused connection (class 08), an administrator's shutdown (57P01-57P03) and too many
# connections (53300): the database is there again soon, or has room again soon. Anything else (a read-only
# database, a missing table, a constraint) is not an outage and is raised at once.
RESTART_SQLSTATES = ("57P01", "57P02", "57P03")  # an administrator's shutdown, a crash, cannot connect now
TRANSIENT_SQLSTATES = ("08", *RESTART_SQLSTATES, "53300")
TRANSIENT_TEXT = ("server closed the connection", "connection refused", "could not connect", "terminating connection",
                  "the database system is starting up", "the database system is shutting down", "connection is closed",
                  "consuming input failed", "too many clients", "connection timeout expired", "ssl connection has been "
                  "closed", "connection already closed", "lost connection", "gone away")

RESTART_TEXT = ("terminating connection due to administrator command", "the database system is shutting down",
                "the database system is starting up", "the database system is in recovery mode")


class LockLost(Exception):
    """The claim lock's own connection died while it was held (the database restarted): another worker may have
    claimed meanwhile, so this claim is withdrawn and made again."""


def is_transient(error: BaseException) -> bool:
    """Whether an error means the storage is unreachable for now (see TRANSIENT_SQLSTATES), not that it refused.
    The whole chain counts: Optuna wraps the driver's error (StorageInternalError), and SQLAlchemy's "can't
    reconnect until invalid transaction is rolled back" follows a connection that died mid-transaction."""
    import sqlalchemy

    for e in _chain(error):
        if isinstance(e, (LockLost, sqlalchemy.exc.PendingRollbackError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) and \
                _says(e, TRANSIENT_SQLSTATES, TRANSIENT_TEXT):
            return True
    return False


def is_restart(error: BaseException) -> bool:
    """Whether the database is restarting (an administrator's shutdown or start-up), not merely unreachable: a
    refused connection may be a wrong URL, this never is."""
    return any(_says(e, RESTART_SQLSTATES, RESTART_TEXT) for e in _chain(error))


def is_full(error: BaseException) -> bool:
    """Whether PostgreSQL refused a connection for max_connections: room comes back as other clients leave."""
    return any(_says(e, ("53300",), ("too many clients",)) for e in _chain(error))


def _chain(error: BaseException | None, most: int = 8) -> Iterator[BaseException]:
    """The error and what it was raised from or while handling (Optuna and SQLAlchemy wrap the driver's)."""
    while error is not None and most > 0:
        yield error
        error, most = error.__cause__ or error.__context__, most - 1


def _says(error: BaseException, states: tuple[str, ...], texts: tuple[str, ...]) -> bool:
    """Whether the database's error (the driver's, which SQLAlchemy keeps in .orig) has one of these SQLSTATE
    prefixes or message parts."""
    orig = getattr(error, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(error, "sqlstate", None) or ""
    text = str(orig or error).lower()
    return state.startswith(states) or any(t in text for t in texts)


@functools.lru_cache(maxsize=8)
def patience(wait_s: float, url: str) -> "Outage":
    """This process's Outage for a storage, shared by the trial loop and the jobs it runs in this process, so that
    an outage is one warning line however many of them wait through it (one per URL, as _study.make_storage)."""
    return Outage(wait_s, url)


class Outage:
    """One process's patience with its storage: `call` retries a step through an outage of up to `wait_s`."""

    def __init__(self, wait_s: float, url: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.wait_s, self.url = wait_s, url
        self.clock, self.sleep = clock, sleep
        self.last_seen: float | None = None  # when the storage last failed to answer (clock time)
        self.in_outage = False  # a step failed, and no answer came SAME_OUTAGE_S after: this process has said so
        self._lock = threading.Lock()  # the heartbeat thread reports outages too

    def call(self, step: Callable[[], T]) -> T:
        """`step()`, retried while the storage is unreachable, for up to wait_s seconds from its first failure."""
        started = None
        delay = FIRST_DELAY_S
        while True:
            try:
                answer = step()
            except Exception as e:
                if not is_transient(e):
                    raise
                now = self.clock()
                self.saw_outage(now)
                if started is None:
                    started = now
                    self._warn_once(now, e)
                left = started + self.wait_s - now
                if left <= 0:
                    raise
                self.sleep(min(delay, left))
                delay = min(2 * delay, MAX_DELAY_S)
                continue
            if self.in_outage:
                with self._lock:  # it answers again, for a while now: the next failure is another outage
                    self.in_outage = self.last_seen is not None and self.clock() - self.last_seen < SAME_OUTAGE_S
            return answer

    def _warn_once(self, now: float, error: Exception) -> None:
        """One line per outage, however many steps of this process wait through it (see SAME_OUTAGE_S)."""
        with self._lock:
            if self.wait_s <= 0 or self.in_outage:
                return
            self.in_outage = True
        log.warning(f"the Optuna storage {mask_secrets(self.url)} does not answer ({one_line(error)}); retrying for "
                    f"up to {self.wait_s:g} s (hydra.sweeper.storage_wait)")

    def saw_outage(self, now: float | None = None) -> None:
        with self._lock:
            self.last_seen = self.clock() if now is None else now

    def recent(self, seconds: float) -> bool:
        """Whether the storage failed to answer within the last `seconds`."""
        with self._lock:
            return self.last_seen is not None and self.clock() - self.last_seen < seconds

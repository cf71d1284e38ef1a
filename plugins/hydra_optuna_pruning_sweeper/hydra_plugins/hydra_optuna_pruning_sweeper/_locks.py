"""Locks between processes, for workers that share a study or a SQLite file.

Each is released when its holder dies (the OS closes the lock file's handle, the database ends the session), so
a worker killed with SIGKILL never blocks the others. Nothing here is Unix-only: the package imports on Windows.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from filelock import FileLock

if TYPE_CHECKING:
    import sqlalchemy


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite URL (relative to the working directory, or absolute); None for other databases
    and in-memory ones."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix):].removeprefix("file:").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def file_lock(database: Path) -> FileLock:
    """An exclusive lock on `<database>.lock`, beside the database file, to use in a `with` block; it waits as
    long as another process holds it. flock on Unix and a locked handle on Windows: both end with the process."""
    return FileLock(f"{database}.lock")


def always_held() -> bool:
    """A file lock's check: the OS holds it as long as this process lives."""
    return True


@contextmanager
def advisory_lock(engine: "sqlalchemy.Engine", name: str) -> Iterator[Callable[[], bool]]:
    """A PostgreSQL session-level advisory lock keyed by `name`. Yields a check of whether the lock is still held:
    a database restart ends the session, and the lock with it.

    The lock belongs to the database session, not to a checkout of its connection: it is taken on a pooled
    connection that goes back to the pool at once, and the holder's queries meanwhile run on that same session.
    So a process needs no connection of its own for the lock (N workers hold N connections, not 2N), as long as
    its pool is one connection (make_storage's, for PostgreSQL): with two, the lock could stay on a session
    nobody unlocks. Every step checks that it has the locking session (its backend pid): one that was replaced
    (reconnected after a restart) holds no lock, and nothing is unlocked on it."""
    import sqlalchemy

    key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:  # waits for the lock here, on the pool's connection
        locker = conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key), pg_backend_pid()"),
                              {"key": key}).one()[1]

    def still_held() -> bool:
        try:
            with engine.connect() as conn:
                return bool(conn.execute(sqlalchemy.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                    "AND pid = :locker AND granted"), {"locker": locker}).scalar())
        except sqlalchemy.exc.SQLAlchemyError:
            return False

    try:
        yield still_held
    finally:
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key) FROM (SELECT pg_backend_pid() AS pid) "
                                             "AS session WHERE pid = :locker"), {"key": key, "locker": locker})
        except sqlalchemy.exc.SQLAlchemyError:
            pass  # its session is gone, and the lock with it

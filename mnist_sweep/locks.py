"""Locks between processes, for workers that share a study or a SQLite file.

Each is released when its holder dies (the OS closes the file, the database ends the session), so a worker
killed with SIGKILL never blocks the others.
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite URL (relative to the working directory, or absolute); None for other databases
    and in-memory ones."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix):].removeprefix("file:").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


@contextmanager
def file_lock(database: Path) -> Iterator[None]:
    """An exclusive flock on `<database>.lock`, beside the database file."""
    with open(f"{database}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextmanager
def advisory_lock(engine: sqlalchemy.Engine, name: str) -> Iterator[None]:
    """A PostgreSQL session-level advisory lock keyed by `name`, on a connection of its own."""
    key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})

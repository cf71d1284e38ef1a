"""The lock beside a shared SQLite study: the other processes wait for it, a killed holder releases it, and it
needs nothing Unix-only (the package imports on Windows)."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import Timeout

from hydra_plugins.hydra_optuna_pruning_sweeper import _locks as locks

PACKAGE = Path(locks.__file__).resolve().parent
UNIX_ONLY = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix"}  # absent from Windows' Python


def test_no_module_imports_anything_unix_only():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in UNIX_ONLY]
    assert not found


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_holder_releases_the_file_lock(tmp_path):
    """Another process takes the lock and is SIGKILLed while holding it: the lock is free at once."""
    database = tmp_path / "optuna.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from hydra_plugins.hydra_optuna_pruning_sweeper import _locks as locks\n"
                               f"with locks.file_lock(Path({str(database)!r})): print('held', flush=True); "
                               "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (tmp_path / "optuna.db.lock").exists()
        with pytest.raises(Timeout):  # held by the other process: this one waits
            locks.file_lock(database).acquire(timeout=0.2)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with locks.file_lock(database).acquire(timeout=5):
            pass
    finally:
        holder.kill()
        holder.wait()

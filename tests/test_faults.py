"""Faults of the places a sweep writes to: a read-only or locked SQLite storage, an unwritable location, a full
disk. Each
stops with one clear line or waits, and what was finished before survives (see docs/reliability.md)."""

import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import cli_args, migrated_mlflow_store, mlflow_runs, run_cli

pytestmark = pytest.mark.slow
SPACE = ["~hparams_search", "model.dropout=interval(0.1,0.6)"]


def sweep_args(tmp_path, mnist_root, storage: str, *extra: str) -> list[str]:
    migrated_mlflow_store(tmp_path)
    return ["--multirun", *cli_args(tmp_path, mnist_root, "trainer.epochs=1", *SPACE),
            f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.study_name=s",
            f"hydra.sweeper.best_config_dir={tmp_path / 'configs'}", *extra]


def test_a_read_only_storage_stops_the_sweep_and_keeps_its_trials(tmp_path, mnist_root):
    db = tmp_path / "optuna.db"
    first = run_cli(sweep_args(tmp_path, mnist_root, f"sqlite:///{db}", "hydra.sweeper.n_trials=1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    second = run_cli(sweep_args(tmp_path, mnist_root, read_only, "hydra.sweeper.n_trials=2"), cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert "readonly database" in line and str(db) in line
    (trial,) = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
    assert trial.state == TrialState.COMPLETE
    _, runs = mlflow_runs(tmp_path)
    assert trial.user_attrs["mlflow_run_id"] in {r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_locked_sqlite_storage_is_waited_for(tmp_path, mnist_root):
    """Another process holds an exclusive lock for a few seconds: the sweep waits (up to 60 s), then runs."""
    db = tmp_path / "optuna.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "mnist_sweep",
                             *sweep_args(tmp_path, mnist_root, f"sqlite:///{db}", "hydra.sweeper.n_trials=1")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    still_waiting = proc.poll() is None
    holder.execute("COMMIT")
    holder.close()
    _, stderr = proc.communicate(timeout=300)
    assert still_waiting and proc.returncode == 0, stderr[-3000:]
    assert [t.state for t in optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials] == \
        [TrialState.COMPLETE]


@pytest.mark.parametrize("where", ["optuna", "mlflow"])
def test_an_unwritable_location_is_one_clear_error(tmp_path, mnist_root, where):
    """A path under a regular file cannot be created, even by root (chmod would not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    storage = f"sqlite:///{blocker / 'optuna.db'}" if where == "optuna" else f"sqlite:///{tmp_path / 'optuna.db'}"
    extra = [f"mlflow.tracking_uri=sqlite:///{blocker / 'mlflow.db'}"] if where == "mlflow" else []
    result = run_cli(sweep_args(tmp_path, mnist_root, storage, "hydra.sweeper.n_trials=1", *extra), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    key = "hydra.sweeper.storage" if where == "optuna" else "mlflow.tracking_uri"
    assert key in line and str(blocker) in line


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 2 MB tmpfs, mounted for the test (root only) and filled up to its last bytes by the test."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs could not be mounted (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_under_the_mlflow_store_is_one_line(tmp_path, mnist_root, full_disk):
    """SQLite's "database or disk is full" when the store's disk has no byte left."""
    migrated_mlflow_store(full_disk)
    with open(full_disk / "filler", "wb", buffering=0) as filler:  # every free byte of the tmpfs
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass
    args = [a if not a.startswith("mlflow.tracking_uri=") else f"mlflow.tracking_uri=sqlite:///{full_disk / 'mlflow.db'}"
            for a in cli_args(tmp_path, mnist_root, "trainer.epochs=1")]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: the MLflow tracking store (mlflow.tracking_uri) has no space left: database or "
                           "disk is full; free space on its disk")

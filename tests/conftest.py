"""Shared fixtures: tiny MNIST-format IDX files with a learnable pattern, and a runner for the real CLI."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
REAL_MNIST = Path(os.environ.get("MNIST_ROOT") or REPO.parent / "shared" / "data").absolute()


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format MNIST ships in: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a bright 5x8 bar at one of ten places, on a noisy background: learnable in one epoch."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        r, col = 3 + (c // 5) * 14, 1 + (c % 5) * 5
        images[i, r:r + 8, col:col + 5] = rng.integers(180, 256, size=(8, 5))
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_synthetic_mnist(root: Path, n_train: int = 1200, n_test: int = 300) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A data.root with 1,200 training and 300 test images in the real IDX format."""
    return make_synthetic_mnist(tmp_path / "data")


# Overrides that make a CLI run take seconds on tiny data: small net, small validation split, no model
# registration at the end of a sweep (torch.export takes seconds; tests/test_report.py covers it), and a sweep's
# trials one at a time in its own process (local worker processes are tested in tests/test_workers.py).
FAST = ["model=small", "data.val_size=200", "data.batch_size=32", "data.download=false", "trainer.epochs=2",
        "trainer.device=cpu", "trainer.threads=1", "mlflow.registered_model=null", "hydra.sweeper.n_jobs=1"]


def run_cli(args: list[str], cwd: Path, timeout: float = 300, module: str = "mnist_sweep",
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mnist_sweep ARGS` in `cwd`, as a user would run it; output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_ROOT": str(cwd / "no-such-data"), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def signal_cli_when(args: list[str], cwd: Path, ready, sig: int, timeout: float = 120) -> tuple[int, str]:
    """Start `python -m mnist_sweep ARGS`, send `sig` once `ready()` is true, wait; returns (exit code, stderr).

    Fails the test when `ready()` does not become true in `timeout` seconds (the run never got that far)."""
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_ROOT": str(cwd / "no-such-data")}
    # SIGINT as a terminal's foreground process has it: a shell that ran the tests in the background (`cmd &`,
    # nohup) leaves it ignored, and a child inherits that, so Ctrl-C would never reach the run
    proc = subprocess.Popen([sys.executable, "-m", "mnist_sweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + timeout
        while not _ready(ready):
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"the run never became ready for {signal.Signals(sig).name}")
            time.sleep(0.5)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)  # a loaded 2-core CI machine is slow to wind down
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, stderr


def _ready(ready) -> bool:
    try:
        return bool(ready())
    except Exception:  # the database is not there yet, or is being written
        return False


def cli_args(tmp_path: Path, mnist_root: Path, *extra: str) -> list[str]:
    """FAST overrides + data and MLflow under tmp_path + Hydra's run dir under tmp_path."""
    return [*FAST, f"data.root={mnist_root}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"hydra.run.dir={tmp_path / 'outputs' / 'run'}", f"hydra.sweep.dir={tmp_path / 'outputs' / 'sweep'}",
            *extra]


_MLFLOW_TEMPLATE: list[Path] = []  # this test process's empty, migrated MLflow store, made on first use


def migrated_mlflow_store(folder: Path) -> None:
    """An empty MLflow store at folder/mlflow.db with its schema already made. MLflow builds a new SQLite store
    through its alembic migrations on first use (2-4 s of CPU here, in every test that sweeps): such tests get a
    copy of one built once per test process. Tests of what happens before a store exists don't call this."""
    target = folder / "mlflow.db"
    if target.exists():
        return
    if not _MLFLOW_TEMPLATE:
        from mlflow.tracking import MlflowClient

        made = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        atexit.register(shutil.rmtree, made, ignore_errors=True)
        MlflowClient(f"sqlite:///{made / 'mlflow.db'}").search_experiments()  # builds the schema
        _MLFLOW_TEMPLATE.append(made / "mlflow.db")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], target)


def mlflow_runs(tmp_path: Path, experiment: str = "mnist_sweep"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="session")
def recorded_study(tmp_path_factory, worker_id) -> Path:
    """One tiny finished sweep shared by the report, registry, predict and browser tests: 3 trials of 2 epochs,
    study 'tiny' in <dir>/optuna.db, MLflow records in <dir>/mlflow.db, synthetic data in <dir>/data.

    Made once per pytest session: under xdist, the first worker to need it makes it in the folder the workers of
    this session share, and the others wait for it (a sweep costs 20-30 s of CPU)."""
    if worker_id == "master":
        return _record_study(tmp_path_factory.mktemp("recorded"))
    folder = tmp_path_factory.getbasetemp().parent / "recorded"  # this session's, shared by its workers
    with FileLock(f"{folder}.lock"):
        if not (folder / "recorded.ok").exists():
            _record_study(folder)
            (folder / "recorded.ok").touch()
    return folder


def _record_study(folder: Path) -> Path:
    root = make_synthetic_mnist(folder / "data")
    migrated_mlflow_store(folder)
    args = [a for a in cli_args(folder, root) if not a.startswith("mlflow.registered_model=")]
    result = run_cli(["--multirun", *args, "mlflow.registered_model=mnist_sweep_best", "~hparams_search",
                      "model.dropout=interval(0.1,0.6)",
                      "optimizer.lr=choice(1e-6,1.0)", "hydra.sweeper.n_trials=3", "hydra/sweeper/sampler=random",
                      "hydra.sweeper.sampler.seed=0", f"hydra.sweeper.storage=sqlite:///{folder / 'optuna.db'}",
                      "hydra.sweeper.study_name=tiny", f"hydra.sweeper.best_config_dir={folder / 'configs'}"],
                     cwd=folder)
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)  # no half-made study for the next worker
        pytest.fail(result.stderr[-3000:])
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server --workers 1` on a free loopback port, as the README tells users to run it; `restart` stops it
    and starts it again on the same port (a tracking server's restart, as the workers see it)."""

    def __init__(self, backend_uri: str, *extra: str, cwd: Path | None = None) -> None:
        port = free_port()
        self.args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, *extra,
                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        self.url = f"http://127.0.0.1:{port}"
        self.cwd, self.proc = cwd, None

    def start(self) -> None:
        """Start it and return once /health answers."""
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True, text=True)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    pytest.fail(f"mlflow server did not start: {self.proc.stderr.read()[-2000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its workers (their own process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def mlflow_server(backend_uri: str, *extra: str, cwd: Path | None = None):
    """A started MlflowServer, stopped afterwards."""
    server = MlflowServer(backend_uri, *extra, cwd=cwd)
    server.start()
    try:
        yield server
    finally:
        server.stop()

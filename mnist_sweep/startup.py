"""`python -m mnist_sweep.startup`: seconds from the sweep's command to its first training step, the wait a user
sees before anything trains.

Each repeat runs `python -m mnist_sweep --multirun` (the default study, its n_jobs local workers) in a fresh folder
on real MNIST, with trainer.epochs=1 and hydra.sweeper.n_trials=2, and stops it (SIGTERM, as Ctrl-C would) once a
trial has trained one step. The folder's MLflow store is a copy of an empty one, as a user's mlflow.db exists
before most sweeps (--fresh-store: none, so the command also creates it, seconds of MLflow's schema migrations).
A run learns where to note its first step from FIRST_STEP_ENV: set only here, so an ordinary run writes nothing
and pays one dictionary lookup per run.

    MNIST_ROOT=/path/to/data python -m mnist_sweep.startup --repeats 3 [--source OTHER_CHECKOUT] [OVERRIDES]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import shell
from .errors import UserError

FIRST_STEP_ENV = "MNIST_SWEEP_FIRST_STEP_FILE"  # a file a run appends the wall time of its first step to
DEFAULT_OVERRIDES = ("hydra.sweeper.n_trials=2", "trainer.epochs=1", "mlflow.registered_model=null")
TIMEOUT_S = 300.0  # a start-up this slow is broken, not slow
POLL_S = 0.05  # seconds between looks at the marker file: the measurement's resolution

Progress = Callable[[Iterable, int], Iterable]


def marking_first_step(progress: Progress, env=os.environ) -> Progress:
    """`progress` (run.py's batch wrapper), which also notes the wall time once the first batch of epoch 1 has been
    trained, when FIRST_STEP_ENV names a file; else `progress` itself."""
    path = env.get(FIRST_STEP_ENV)
    if not path:
        return progress

    def marked(batches: Iterable, epoch: int) -> Iterator:
        for i, batch in enumerate(progress(batches, epoch)):
            yield batch  # returns once the loop asks for the next batch: this one has been trained
            if i == 0 and epoch == 1:
                with open(path, "a") as f:  # one short append per process: workers' lines do not interleave
                    f.write(f"{time.time()!r}\n")

    return marked


def first_step_seconds(overrides: list[str], folder: Path, env: dict[str, str], store: Path | None) -> float:
    """One repeat: start the sweep in `folder`, wait for the first step anywhere in it, stop it; the seconds from
    just before the command started to that step."""
    marker = folder / "first_step"
    if store is not None:
        shutil.copyfile(store, folder / "mlflow.db")  # where the app's default mlflow.tracking_uri points
    command = [sys.executable, "-m", "mnist_sweep", "--multirun", *overrides]
    log = open(folder / "sweep.log", "w")
    started = time.time()
    proc = subprocess.Popen(command, cwd=folder, env={**env, FIRST_STEP_ENV: str(marker)}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        while not marker.is_file() or not marker.read_text().strip():
            if proc.poll() is not None:
                raise RuntimeError(f"the sweep ended (exit {proc.returncode}) before training a step; its log: "
                                   f"{folder / 'sweep.log'}")
            if time.time() - started > TIMEOUT_S:
                raise RuntimeError(f"no training step in {TIMEOUT_S:g} s; its log: {folder / 'sweep.log'}")
            time.sleep(POLL_S)
        first = min(float(line) for line in marker.read_text().split())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the sweep stops its workers and marks the runs KILLED
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return first - started


def child_env(source: Path | None) -> dict[str, str]:
    """The code of `source` (a checkout; None: an installed copy), and MNIST where the user keeps it."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


def empty_mlflow_store(path: Path) -> Path:
    """An MLflow SQLite store with MLflow's tables and nothing else."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="sweeps to time, one after another (default 3)")
    parser.add_argument("--source", metavar="CHECKOUT", help="time the code of this checkout (default: this one), "
                        "e.g. an older commit's, to compare")
    parser.add_argument("--fresh-store", action="store_true", help="no MLflow store in the folder: the sweep creates "
                        "it, as the first sweep in a folder does")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR/<repeat>/ and keep the logs (default: a temporary "
                        "folder, removed afterwards)")
    parser.add_argument("overrides", nargs="*", help="more overrides, after " + " ".join(DEFAULT_OVERRIDES))
    return parser.parse_args(argv)


@shell.command(stopped="the running sweep was stopped")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.environ.get("MNIST_ROOT") and not any(o.startswith("data.root=") for o in args.overrides):
        raise UserError("set MNIST_ROOT (or pass data.root=DIR) to a folder with MNIST/raw/: the start-up is timed "
                        "on the real data")
    from .config import SOURCE

    source = Path(args.source).absolute() if args.source else SOURCE
    if args.source and not (source / "mnist_sweep" / "__main__.py").is_file():
        raise UserError(f"--source {args.source}: no checkout of mnist_sweep there (no mnist_sweep/__main__.py)")
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    print(f"{source or 'installed'}: python -m mnist_sweep --multirun {shlex.join(overrides)}"
          + (" (fresh MLflow store)" if args.fresh_store else ""), file=sys.stderr, flush=True)
    env, seconds = child_env(source), []
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        base = Path(args.keep).absolute() if args.keep else Path(tmp)
        store = None if args.fresh_store else empty_mlflow_store(Path(tmp) / "empty-mlflow.db")
        for i in range(args.repeats):
            folder = base / str(i)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                seconds.append(first_step_seconds(overrides, folder, env, store))
            except RuntimeError as e:
                kept = "" if args.keep else " (pass --keep DIR to keep the log)"
                print(f"{shell.error_line(e)}{kept}", file=sys.stderr)
                return 1  # not 2: the command was right, the measurement failed
            print(f"repeat {i + 1}: first training step {seconds[-1]:.2f} s after the command", flush=True)
    spread = f" ± {statistics.stdev(seconds):.2f}" if len(seconds) > 1 else ""
    print(f"mean {statistics.mean(seconds):.2f}{spread} s, min {min(seconds):.2f} s over {len(seconds)} repeat(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

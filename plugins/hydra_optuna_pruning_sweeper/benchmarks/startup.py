"""What the installed plugin costs a Hydra app that never sweeps with it: the start-up of a plain 5-line Hydra app,
timed N times in three environments, interleaved so that a busy machine slows all three alike:

- `hydra only`: a fresh venv with only hydra-core (the same version as the app environment's);
- `+ plugin`: a fresh venv with hydra-core and this plugin installed from the checkout (not editable), with its
  dependencies (Optuna, SQLAlchemy...): the difference to `hydra only` is the plugin itself;
- `app env`: the given interpreter's environment (default: the one running this script), e.g. mnist_sweep's
  .venv with torch, MLflow, the upstream sweeper and launchers beside the plugin.

    python plugins/hydra_optuna_pruning_sweeper/benchmarks/startup.py [-n 15] [--venvs DIR] [--app-python PY]

The fresh venvs are made once under --venvs (pip from the configured index) and reused. Prints each median with
its spread (min-max), the ratios to `hydra only`, and the CPU's flags. A measurement, not a test: it never fails
on a number.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1]  # plugins/hydra_optuna_pruning_sweeper
APP = '''
import hydra

@hydra.main(config_path=None)
def main(cfg):
    pass

if __name__ == "__main__":
    main()
'''


def venv(folder: Path, *packages: str) -> Path:
    """A venv at `folder` holding `packages` (made once); returns its python."""
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return python


def start_up(python: Path, app: Path) -> float:
    """Seconds from starting the interpreter to its exit, for one run of the plain app."""
    started = time.perf_counter()
    subprocess.run([str(python), str(app), f"hydra.run.dir={app.parent / 'run'}"], cwd=app.parent, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": ""})
    return time.perf_counter() - started


def cpu_flags() -> str:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(sorted(w for w in words if w.startswith("avx") or w == "fma")) or "none of avx*, fma"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="runs per environment")
    parser.add_argument("--venvs", type=Path, default=Path(tempfile.gettempdir()) / "hydra-startup-venvs",
                        help="where the fresh venvs are made (and reused)")
    parser.add_argument("--app-python", type=Path, default=Path(sys.executable),
                        help="the app environment's interpreter")
    args = parser.parse_args()
    hydra = f"hydra-core=={importlib.metadata.version('hydra-core')}"
    envs = {"hydra only": venv(args.venvs / "hydra-only", hydra),
            "+ plugin": venv(args.venvs / "hydra-plugin", hydra, str(PLUGIN)),
            "app env": args.app_python}
    with tempfile.TemporaryDirectory() as folder:
        app = Path(folder) / "app.py"
        app.write_text(APP)
        for python in envs.values():  # a first run of each fills the OS's file cache and writes .pyc files
            start_up(python, app)
        times: dict[str, list[float]] = {name: [] for name in envs}
        for _ in range(args.n):
            for name, python in envs.items():
                times[name].append(start_up(python, app))
    base = statistics.median(times["hydra only"])
    print(f"start-up of a plain Hydra app ({hydra}), {args.n} runs each, interleaved; CPU flags: {cpu_flags()}")
    for name, python in envs.items():
        runs = times[name]
        median = statistics.median(runs)
        print(f"  {name:10s} {median:6.3f} s median ({min(runs):.3f}-{max(runs):.3f})  x{median / base:.2f}  "
              f"[{python}]")


if __name__ == "__main__":
    main()

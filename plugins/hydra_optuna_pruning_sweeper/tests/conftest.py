"""What the plugin's end-to-end tests share: a foreign Hydra app written into a folder, and its sweep run as its
users run it (`python app.py --multirun ...`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def write_app(folder: Path, source: str, values: dict, sweeper: dict, sweeper_name: str = "optuna_pruning") -> Path:
    """`folder`/app.py (`source`) and its config.yaml: the app's `values`, and `sweeper` as the hydra.sweeper
    settings of hydra/sweeper=`sweeper_name`; the sweep's folders stay inside `folder`, and jobs keep its cwd."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(source)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "defaults": [{"override hydra/sweeper": sweeper_name}, "_self_"], **values,
        "hydra": {"sweeper": sweeper, "sweep": {"dir": str(folder / "multirun")}, "job": {"chdir": False}}}))
    return folder


def run_sweep(folder: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "--multirun", *overrides], cwd=folder, capture_output=True,
                          text=True, timeout=timeout)

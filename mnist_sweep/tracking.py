"""MLflow records of mnist_sweep's runs: what every training run records about its environment, and the settings
that predict and report read back. The generic run handling (a run that always ends with a status, retries on a
locked SQLite store, the sweeper's parent and trial runs) is the sweeper plugin's, re-exported here. No torch here:
artifacts.py logs and loads the net.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from hydra_plugins.hydra_optuna_pruning_sweeper import (  # noqa: F401  (re-exported for the app's modules)
    END_REASON_TAG, KIND_TAG, OPTIMIZED_METRIC_PARAM, PARENT_TAG, STUDY_KIND, STUDY_TAG, TRIAL_NUMBER_TAG,
    TRIAL_STATE_TAG, RunRecorder, check_server, child_runs, disk_space, existing_client, experiment_id, make_client,
    retry_locked)
from hydra_plugins.hydra_optuna_pruning_sweeper import source_tags as sweeper_source_tags

REPLAY_OF_TAG = "replay_of"  # a run made by `python -m mnist_sweep.replay`: the id of the run it replays
# Every training run's environment (run.py writes them; replay.py compares a replay's with its original's): what
# its result depends on besides its config
DEVICE_TAG = "device"  # the torch device it trained on: cpu, cuda, cuda:1, mps
THREADS_TAG = "torch_threads"  # torch's CPU threads while it trained
CPU_TAG = "cpu"  # the CPU's model name
CPU_FLAGS_TAG = "cpu_flags"  # the speed-relevant CPU flags it has (machine.SPEED_FLAGS), space-separated
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the commit of the checkout it ran from
PACKAGES = ("torch", "torchvision", "hydra-core", "optuna", "mlflow")  # whose versions every run records
VERSION_TAGS = {package: f"version.{package}" for package in PACKAGES}  # version.torch: 2.14.1+cpu, ...
ENVIRONMENT_TAGS = (*VERSION_TAGS.values(), CPU_TAG, CPU_FLAGS_TAG, THREADS_TAG, DEVICE_TAG, GIT_COMMIT_TAG)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form (MLflow params are strings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


TTA_SHIFTS_PARAM = "trainer.tta_shifts"  # the logged config key: predict and report score a run's images as it did


def input_settings(client, run_id: str) -> tuple[float, float, int]:
    """(mean, std, test-time shifts) of a run: its net's inputs must be normalized the same way, and scored over the
    same shifts as it was validated and tested (0: none; runs from before the option have none)."""
    params = client.get_run(run_id).data.params
    return float(params["data.mean"]), float(params["data.std"]), int(params.get(TTA_SHIFTS_PARAM, 0))


PROGRESS_BAR_VAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's switch for its per-transfer progress bars


def quiet_artifact_progress() -> None:
    """For our own entry points (report, predict): MLflow's 'Downloading artifacts' bars for a few small files are
    noise there. Only this process is affected; a value the user set is kept."""
    os.environ.setdefault(PROGRESS_BAR_VAR, "false")


@contextmanager
def quiet_transfers() -> Iterator[None]:
    """quiet_artifact_progress for one call, in processes whose entry point is not ours to set (a sweep)."""
    before = os.environ.get(PROGRESS_BAR_VAR)
    quiet_artifact_progress()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR_VAR, None)


SOURCE_NAME = "mnist_sweep"  # what the runs table shows under Source: the package's entry point


def source_tags() -> dict[str, str]:
    """MLflow's source tags of a run started by `python -m mnist_sweep` from a local checkout."""
    return sweeper_source_tags(SOURCE_NAME)

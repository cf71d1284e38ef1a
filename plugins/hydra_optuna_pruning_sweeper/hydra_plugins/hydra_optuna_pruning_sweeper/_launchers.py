"""What the sweeper does about the launcher that runs its jobs (Hydra's basic or joblib launcher, submitit's SLURM
launcher, or hydra/launcher=slurm's subclass of it in _slurm.py): register and check SLURM, share the cores
between parallel job processes, and quiet the launchers' own per-job lines."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from hydra.core.plugins import Plugins
from omegaconf import DictConfig, OmegaConf

from ._local_workers import thread_env

# the _target_ of a launcher config that picks the SLURM launcher of this package (the [slurm] extra)
SLURM_LAUNCHER = "hydra_plugins.hydra_optuna_pruning_sweeper._slurm.SlurmLauncher"


def register_slurm_launcher(launcher_cfg: DictConfig) -> None:
    """hydra/launcher=slurm's launcher (_slurm.py) is registered (Hydra's public Plugins.register) when chosen, and
    only then imported, since it needs the submitit plugin: Hydra's scan skips private modules, and an entry point
    would make every run without that plugin warn that it cannot be loaded."""
    if OmegaConf.select(launcher_cfg, "_target_") == SLURM_LAUNCHER:
        from . import _slurm as slurm

        Plugins.instance().register(slurm.SlurmLauncher)


def check_cluster(launcher: Any) -> None:
    """A SLURM launcher (Hydra's submitit plugin, or hydra/launcher=slurm's subclass of it) needs a controller
    that answers: asked before the study is opened, so a cluster that is down is one error line and no trial.
    Other launchers need no check; the plugin is not imported for them."""
    plugin = sys.modules.get("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    if plugin is not None and isinstance(launcher, plugin.SlurmLauncher):
        from . import _slurm as slurm

        slurm.check_cluster()


def share_cores(launcher: Any, n_jobs: int) -> None:
    """Parallel joblib job processes share the cores: each gets cores // n_jobs OpenMP threads (torch, numpy),
    inherited from this process's environment, unless the user set OMP_NUM_THREADS (local workers get theirs in
    their own environment)."""
    if type(launcher).__name__ == "JoblibLauncher":
        os.environ.update(thread_env(os.environ, n_jobs, os.cpu_count()))


def quiet_launcher_logs() -> None:
    """Hydra's launchers print each job's full override list (16-digit floats, internal keys); the sweeper's own
    trial lines say the same in a form people read."""
    for name in ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher"):
        logging.getLogger(name).setLevel(logging.WARNING)

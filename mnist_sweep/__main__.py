"""`python -m mnist_sweep` (or `mnist-sweep`): the Hydra entry point. With config.py, the only reader of the
app's DictConfig: it turns the composed config into dataclasses, trains and records one run (run.py), and returns
the optimized metric, which is what a sweeper reads."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from . import shell, tracking
from .config import CONFIG_PATH, build_recording, build_spec
from .errors import ConfigError, unresolved
from hydra_plugins.hydra_optuna_pruning_sweeper import has_literal_password

if TYPE_CHECKING:
    from .train import RunSpec

log = logging.getLogger("mnist_sweep")
# Hydra builds our own callback and sweeper from _target_ without a whitelist; they are this package's code
warnings.filterwarnings("ignore", message=r".*resolved _target_='mnist_sweep\.")


class OutputDirCheck(Callback):
    """Checks made before Hydra writes or prints anything (hydra.callbacks in conf/config.yaml), each one line:
    an unwritable output folder (else Hydra's traceback), and a password written out in a URL (else Hydra saves
    it in every job's .hydra/ files)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_no_literal_password(config)
        _check_resolvable(config, sweeping=False)
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_no_literal_password(config)
        _check_resolvable(config, sweeping=True)
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def _check_resolvable(config: DictConfig, sweeping: bool) -> None:
    """Every interpolation of the run's config (and of the sweeper's settings, in a sweep) resolves: an unset
    ${oc.env:VAR} is this line, not a traceback from deep inside Hydra or a run. Hydra's runtime keys are Hydra's."""
    keys = [k for k in config if k != "hydra"] + (["hydra.sweeper"] if sweeping else [])
    try:
        for key in keys:
            node = OmegaConf.select(config, key)  # a scalar resolves here, a node below
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError as e:
        print(shell.error_line(str(unresolved(e))), file=sys.stderr)
        raise SystemExit(shell.ERROR_EXIT) from None


def _check_no_literal_password(config: DictConfig) -> None:
    """A password may reach a URL only at run time (${oc.env:VAR}, PGPASSWORD, ~/.pgpass), never as text."""
    tree = OmegaConf.to_container(config, resolve=False)
    for key, value in tracking.flatten(tree).items():
        if isinstance(value, str) and has_literal_password(value):  # error_line masks it
            print(shell.error_line(f"{key}={value} holds a password in clear text, which would be saved in logs, "
                                   f"Hydra's output folders and MLflow. {password_advice(value)}"), file=sys.stderr)
            raise SystemExit(shell.ERROR_EXIT)


def password_advice(url: str) -> str:
    """Where the password of this kind of URL goes instead: a tracking server (http) takes MLflow's own variables;
    PostgreSQL takes PGPASSWORD or ~/.pgpass; any URL may read one from the environment at run time."""
    env = "write it as ${oc.env:MY_DB_PASSWORD} and export MY_DB_PASSWORD"
    if url.lstrip("'\"").startswith(("http://", "https://")):
        return ("Leave user and password out of the URL and export MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (MLflow sends them to the server), or {env}")
    return f"Leave it out of the URL and set PGPASSWORD or ~/.pgpass, or {env}"


def _check_writable(folder: str, key: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        print(shell.error_line(f"{key}={folder} is not a writable folder ({e.strerror or e}); point it at one, "
                               f"e.g. {key}=outputs/runs/today"), file=sys.stderr)
        raise SystemExit(shell.ERROR_EXIT) from None


def run_config(cfg: DictConfig, env: Mapping[str, str], sweeping: bool = False) -> list[float]:
    """Check the config, then train and record one run (a sweep's trial when `env` says so)."""
    # torch comes with it: a sweep's main process only starts workers, and starts them sooner without it
    from .run import train_and_record

    spec, recording = build_spec(cfg), build_recording(cfg)
    check_sweepable(spec, sweeping)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    values, _ = train_and_record(spec, recording, tracking.flatten(resolved), OmegaConf.to_yaml(resolved), env)
    return values


def check_sweepable(spec: RunSpec, sweeping: bool) -> None:
    """A sweep that optimizes val/* must validate on unseen images: refuse data.train_on_val there."""
    seen = [m for m in spec.optimized_metric if m.startswith("val/")]
    if sweeping and spec.data.train_on_val and seen:
        raise ConfigError(f"data.train_on_val=true in a sweep that optimizes {', '.join(seen)}: the validation "
                          "images would be trained on, so the sweep would pick the settings that memorize them; "
                          "sweep with data.train_on_val=false, then refit the best settings with it")


@hydra.main(config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        values = run_config(cfg, os.environ, sweeping)
    except shell.SHOWN as e:
        if sweeping:  # the sweeper ends the trial (FAIL, or interrupted) and says why once for the whole sweep
            raise
        # inside the task function: an exception let out of it would reach Hydra, which prints its own report
        raise SystemExit(shell.exit_status(e, "the MLflow run is marked KILLED")) from None
    return values[0] if len(values) == 1 else values


APP_NAME = "mnist-sweep"  # the console script ([project.scripts] in pyproject.toml)


def cli() -> None:
    # Hydra's bash completion registers itself for the program in argv[0]; under `python -m` that is this file,
    # which would hook every `python` command and still complete nothing. Name the console script instead.
    sys.argv[0] = APP_NAME
    # SIGTERM (kill, docker stop, SLURM, Kubernetes) ends runs and sweeps the way Ctrl-C does, not abruptly: the
    # shell's handler, set for the whole process (it is this command's), where the other commands set it per main()
    signal.signal(signal.SIGTERM, shell.raise_terminated)
    main()


if __name__ == "__main__":
    cli()

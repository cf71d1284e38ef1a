"""The sweeper behind `hydra/sweeper=optuna_pruning` (the facade in optuna_pruning_sweeper.py imports this module
when a sweep starts): the hydra-optuna-sweeper plugin's search-space grammar and samplers, for any Hydra app, plus
what that plugin lacks. It reads only its own settings (`hydra.sweeper.*`) and knows nothing of the app it sweeps.

    python my_app.py --multirun hydra/sweeper=optuna_pruning 'x=interval(-5,5)' hydra.sweeper.n_trials=30

- Pruning: a job calls `current_trial().report(value, step)` (this package's) per epoch; the pruner
  (`hydra/sweeper/pruner=median|hyperband|successive_halving|none`) stops it by raising optuna.TrialPruned.
  The trial's identity reaches the job through environment variables, so basic, joblib and SLURM jobs all prune.
- Resume (`total_budget: true`): `n_trials` is the study's total; the same command continues the same study, and
  trials of dead or interrupted processes are failed and re-run once (`heartbeat_interval`, _recovery.py).
- Workers: the same command on many machines shares one study and its budget exactly (claims under a lock).
  With `local_workers: true` the sweep starts n_jobs such workers on this machine itself (_worker_pool.py):
  a core takes the next trial as soon as its own ends or is pruned, with no batch barrier.
- MLflow (`mlflow.tracking_uri`): one parent run per study, one child run per trial (_tracker.py).
- The winner: `best_config_dir` gets the best trial as an experiment config; `on_best` is called with its run.

Where to read on: _settings.py (what was asked, checked), _main.py (the main process) or _worker.py (a local
worker), both of which run _trial_loop.py; _summary.py (what is printed and written at the end).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import optuna
import sqlalchemy
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from . import _local_workers as local_workers
from ._errors import StopSweep, Terminated, UserError, one_line
from ._launchers import register_slurm_launcher
from ._main import MainProcess
from ._redact import mask_secrets
from ._settings import check_settings
from ._study import quiet_optuna
from ._worker import WorkerProcess


class SweepRun:
    """One invocation of the sweeper (the facade in optuna_pruning_sweeper.py builds it when the sweep starts):
    the settings checked, the role of this process picked, and every way it can end turned into an exit code
    and at most one line."""

    def __init__(self, **hydra_settings: Any) -> None:
        # Checked in sweep(), where a bad value is one error line; raised here it would be Hydra's traceback
        self.hydra_settings = hydra_settings

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.compose = functools.partial(hydra_context.config_loader.load_sweep_config, config)
        register_slurm_launcher(config.hydra.launcher)
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        worker = local_workers.LocalWorker.from_env(os.environ)
        # A local worker hands its error line to the main process, which shows the first failure's line only
        say = worker.report if worker else functools.partial(print, file=sys.stderr)
        quiet_optuna()
        role = None
        try:
            if worker is not None:
                local_workers.stop_once_on_signals()
            settings = check_settings(**self.hydra_settings)
            role = WorkerProcess(settings, self.config, self.launcher, worker) if worker else \
                MainProcess(settings, self.config, self.launcher, self.compose)
            with local_workers.terminated_on_sigterm():
                role.run(arguments)
        except (UserError, StopSweep) as e:
            say(f"error: {mask_secrets(str(e))}")
            raise SystemExit(2) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # read-only, gone
            say(f"error: Optuna storage {mask_secrets(str(self.hydra_settings.get('storage')))!r} "
                f"(hydra.sweeper.storage) failed: {mask_secrets(one_line(e))}; finished trials are kept, run the "
                "same command again to resume")
            raise SystemExit(2) from None
        except local_workers.WorkerFailed as e:
            print(e.line, file=sys.stderr)
            raise SystemExit(e.code) from None
        except KeyboardInterrupt as e:
            if worker is None:  # the main process says it once, for its workers too
                how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
                if getattr(role, "trials_over", False):
                    print(f"{how} after every trial had ended: they are all in the study; the summary (results "
                          "file, best config) may be incomplete", file=sys.stderr)
                else:
                    print(f"{how}: a running trial is marked FAIL in the study (its parameters run again on "
                          "resume) and its MLflow run KILLED; run the same command again to resume",
                          file=sys.stderr)
            raise SystemExit(143 if isinstance(e, Terminated) else 130) from None

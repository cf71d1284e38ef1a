"""`hydra/sweeper=optuna_pruning`: the class Hydra finds when it scans its plugins. A facade: the sweeper itself
(_sweeper.py, with Optuna, SQLAlchemy and MLflow) is imported only when a sweep with this sweeper starts, so an app
that has the plugin installed and never sweeps with it pays nothing for it."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from . import config as config  # noqa: F401  (registers hydra/sweeper=optuna_pruning when Hydra loads this class)


class OptunaPruningSweeper(Sweeper):
    """Hydra builds it from `hydra.sweeper` (config.OptunaPruningSweeperConf): the settings are checked when the
    sweep starts, so a bad one is one error line rather than Hydra's traceback."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.impl: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ._sweeper import SweepRun

        self.impl = SweepRun(**self.settings)
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.impl.sweep(arguments)

"""The errors a person sees: one clear sentence, no stack trace.

The CLI prints these as they are and exits non-zero; anything else is a bug and keeps its traceback. The sweep's
own errors (StopSweep, ConfigError, ...) are the sweeper plugin's, so that a job's ConfigError stops the sweep;
the app adds those of MNIST and training.
"""

from hydra_plugins.hydra_optuna_pruning_sweeper import (  # noqa: F401  (re-exported for the app's modules)
    MAX_LINE, ConfigError, JobInterrupted, StopSweep, Terminated, UserError, one_line, unresolved)


class DataError(UserError, StopSweep):
    """MNIST could not be found, downloaded or parsed."""


class DivergedError(UserError):
    """The training loss became NaN or infinite."""

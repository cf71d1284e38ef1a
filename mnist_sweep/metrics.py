"""The metrics a run records and which way each one is better: the one table that the config's resolvers (the
sweep's directions) and the run's checks read. No torch here: a sweep's main process, which composes the config
but never trains, resolves the directions too."""

from __future__ import annotations

from typing import Any, Iterable

from .errors import ConfigError

# Every metric a run records, with the direction that makes it better. The same strings are MLflow metric
# keys, Optuna objective names and valid values of `optimized_metric`.
METRIC_DIRECTIONS = {
    "val/acc": "maximize",
    "val/loss": "minimize",
    "train/loss": "minimize",
    "epoch_seconds": "minimize",
    "train/images_per_s": "maximize",
    "model/params": "minimize",
}
FINAL_ONLY_METRICS = ("test/acc", "test/loss")  # never an objective: the test set is not for selection


def check_metric_names(names: Iterable[str]) -> None:
    for name in names:
        if name in FINAL_ONLY_METRICS:
            raise ConfigError(f"optimized_metric={name!r} is measured on the test set, which is never used for "
                              f"selection; allowed: {', '.join(METRIC_DIRECTIONS)}")
        if name not in METRIC_DIRECTIONS:
            raise ConfigError(f"optimized_metric={name!r} is not a metric this project records; allowed: "
                              f"{', '.join(METRIC_DIRECTIONS)}")


def metric_names(metrics: Any) -> list[str]:
    """optimized_metric, one name or a list of them, as a list."""
    return [metrics] if isinstance(metrics, str) else list(metrics)


def metric_directions(metrics: Any) -> list[str]:
    """optimized_metric -> the sweep's directions (val/acc maximize, losses and seconds minimize)."""
    names = metric_names(metrics)
    check_metric_names(names)
    return [METRIC_DIRECTIONS[m] for m in names]

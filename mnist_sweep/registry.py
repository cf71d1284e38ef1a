"""The sweep's winner in the MLflow model registry: the sweeper's `on_best` hook for this app."""

from __future__ import annotations

import logging

from . import tracking

log = logging.getLogger("mnist_sweep")


def register_best(run_id: str, tracking_uri: str, name: str | None) -> dict[str, str]:
    """Register the best trial's net under `name` (a run registered before keeps its version); returns the tags
    the sweeper puts on the study's parent run. `name` null: nothing is registered."""
    if not name:
        return {}
    version = tracking.register_model(tracking.make_client(tracking_uri), run_id, name)
    uri = f"models:/{name}/{version.version}"
    log.info(f"best model registered in MLflow as {uri}")
    return {"model_uri": uri}

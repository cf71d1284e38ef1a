"""The sweep's winner in the MLflow model registry: the sweeper's `on_best` hook for this app, registration as an
MLflow Logged Model, and loading a registered version back. torch is imported by the calls that load a net, not
with the module: the hook runs in a sweep's main process, which never trains."""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from . import tracking
from .errors import UserError, one_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mnist_sweep")
LOGGED_MODEL_NAME = "model"  # the name of the MLflow Logged Model a registration creates from a run
REGISTERED_MODEL_DESCRIPTION = ("The best trial of an mnist_sweep study: logits of the 10 digits for (N, 1, 28, 28) "
                                "images normalized with the metadata's input_mean and input_std; with tta_shifts > 0 "
                                "in the metadata the run scored each image as the mean of the class probabilities "
                                "of it and of it shifted by that many pixels up, down, left and right")



def register_best(run_id: str, tracking_uri: str, name: str | None) -> dict[str, str]:
    """Register the best trial's net under `name` (a run registered before keeps its version); returns the tags
    the sweeper puts on the study's parent run. `name` null: nothing is registered."""
    if not name:
        return {}
    version = register_model(tracking.make_client(tracking_uri), run_id, name)
    uri = f"models:/{name}/{version.version}"
    log.info(f"best model registered in MLflow as {uri}")
    return {"model_uri": uri}


def register_model(client, run_id: str, name: str):
    """Log the run's net as an MLflow pytorch model (a Logged Model of the run) with a signature and register it
    as a version of `name`; returns the ModelVersion.

    Signature: input float32 (N, 1, 28, 28) images normalized as in training, (pixel/255 - mean) / std, with the
    run's data.mean and data.std (also in the model's metadata); output float32 (N, 10) logits, whose softmax is
    the class probabilities. The metadata's tta_shifts is the run's trainer.tta_shifts: predict and the report
    average over those shifts as the run did. A run registered before keeps its version (a resumed sweep does not
    add one).
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from .artifacts import load_model
    from .data import background
    from .model import IMAGE_SIZE, NUM_CLASSES

    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            return version
    mean, std, shifts = tracking.input_settings(client, run_id)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]))
    net = load_model(client, run_id)
    # pt2: torch.export's traced graph loads without our code and without unpickling; the example's batch of 2
    # keeps the batch dimension dynamic. Explicit requirements: MLflow would otherwise infer them by loading the
    # model in a subprocess (slow).
    blank = torch.full((2, 1, IMAGE_SIZE, IMAGE_SIZE), background(mean, std))
    # Made here, not by log_model, which would put it in the process's active experiment (Default), not the run's
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                                        params=run.data.params)
    with process_tracking_uri(client.tracking_uri), tracking.quiet_transfers():
        # run_id goes on to mlflow.models.Model.log, which documents it: the model is logged into the finished run
        # without reopening it (mlflow.start_run(run_id=...) would set it RUNNING and rewrite its end time).
        info = mlflow.pytorch.log_model(net, model_id=logged.model_id, run_id=run_id, registered_model_name=name,
                                        await_registration_for=0, signature=signature, input_example=blank.numpy(),
                                        serialization_format="pt2",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                        metadata={"input_mean": mean, "input_std": std, "output": "logits",
                                                  "tta_shifts": shifts},
                                        step=_last_step(client, run_id, "test/acc"))
    client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    return client.get_model_version(name, str(info.registered_model_version))


def load_registered_model(client, name: str, version: str) -> tuple[torch.nn.Module, float, float, int]:
    """(net, input mean, input std, test-time shifts) of the registered model version models:/<name>/<version>: the
    logged MLflow model itself, not the weights of its run. Raises UserError when it cannot be loaded."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp, tracking.quiet_transfers():
        try:
            # the client finds the version's files: MLflow resolves a models:/ URI in the process-wide registry
            location = client.get_model_version_download_uri(name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                       tracking_uri=client.tracking_uri)
            meta = Model.load(local).metadata or {}
            net = mlflow.pytorch.load_model(local)
            mean, std = float(meta["input_mean"]), float(meta["input_std"])
            shifts = int(meta.get("tta_shifts", 0))  # versions registered before the option have none
        except Exception as e:  # missing version or files, a truncated file, no metadata: all the same to a user
            raise UserError(f"models:/{name}/{version} (tracking URI {client.tracking_uri}) could not be loaded: "
                            f"{one_line(e)}; register it again (run the sweep) or pass --run-id") from None
    return net, mean, std, shifts


def _last_step(client, run_id: str, metric: str) -> int:
    """The step `metric` was last logged at (0 if never): MLflow links the run's metrics of that step to a model
    logged at it, so the Logged Model shows the test accuracy."""
    history = client.get_metric_history(run_id, metric)
    return max((m.step for m in history), default=0)


@contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging and registration read the process-wide tracking URI (mlflow.set_tracking_uri, which
    also writes MLFLOW_TRACKING_URI): set it for their call only, then put back what was there."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    if before == env:
        before = None  # it came from the environment, restored below
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def latest_model_version(client, name: str):
    """The newest version of a registered model, or None when there is no such model."""
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version), default=None)

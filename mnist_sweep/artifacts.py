"""What a training run leaves in MLflow besides its metrics and params: the net's weights (and rebuilding the net
from them), the dataset it trained on, and the test set's confusion matrix. Needs torch: only processes that train
or load a net import it (a sweep's main process records through tracking.py and the sweeper plugin alone)."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path

import torch

from .data import DataConfig, Splits, load_mnist
from .model import IMAGE_SIZE, ModelConfig, build_model
from .tracking import RunRecorder, disk_space, quiet_transfers, retry_locked

WEIGHTS_FILE = "model/weights.pt"
MODEL_CONFIG_FILE = "model/model_config.json"
DATASET_NAME = "mnist"
_DUPLICATE_KEY = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry")  # PostgreSQL, SQLite, MySQL


def log_model_weights(rec: RunRecorder, model: torch.nn.Module, cfg: ModelConfig) -> None:
    """state_dict + the ModelConfig that rebuilds it, in the run's model/ folder; `load_model` reads them back."""
    state = getattr(model, "_orig_mod", model).state_dict()  # unwrap torch.compile
    weights = io.BytesIO()  # a file torch writes itself fails with a RuntimeError that hides the errno
    torch.save({k: v.detach().cpu() for k, v in state.items()}, weights)
    with disk_space(tempfile.gettempdir, "the model weights"), tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        (folder / Path(WEIGHTS_FILE).name).write_bytes(weights.getbuffer())
        (folder / Path(MODEL_CONFIG_FILE).name).write_text(json.dumps(cfg.__dict__, indent=2))
        with disk_space(rec.artifact_location, "the model weights"):
            retry_locked(rec.client.log_artifacts, rec.run_id, str(folder), "model")


def load_model(client, run_id: str) -> torch.nn.Module:
    """Rebuild a logged model from its run: the inverse of log_model_weights."""
    with tempfile.TemporaryDirectory() as tmp, quiet_transfers():
        cfg_path = client.download_artifacts(run_id, MODEL_CONFIG_FILE, tmp)
        weights_path = client.download_artifacts(run_id, WEIGHTS_FILE, tmp)
        model = build_model(ModelConfig(**json.loads(Path(cfg_path).read_text())))
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()


def log_dataset(client, run_id: str, cfg: DataConfig, splits: Splits) -> None:
    """The run's training data as an MLflow dataset input (the runs table's Dataset column): 'mnist', a digest of
    the files' contents and of the split, and the split sizes in its profile."""
    import numpy as np
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    sizes = {"train": splits.num_train, "val": splits.num_val, "test": splits.num_test}
    # the split is part of what a run saw: one digest per (files, split), so the stored profile fits every run
    # that logs it (MLflow keeps one dataset per name and digest in an experiment)
    content = load_mnist(cfg.root, cfg.download).content_digest
    split = f"val_size={cfg.val_size} split_seed={cfg.split_seed}" + (" train_on_val" if cfg.train_on_val else "")
    digest = hashlib.sha256(f"{content} {split}".encode())
    schema = {"mlflow_tensorspec": {
        "features": Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE), "images")]).to_json(),
        "targets": Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]).to_json()}}
    dataset = Dataset(name=DATASET_NAME, digest=digest.hexdigest()[:16], source_type="local",
                      source=json.dumps({"uri": str(Path(cfg.root).expanduser().absolute() / "MNIST" / "raw")}),
                      schema=json.dumps(schema), profile=json.dumps(sizes | {"files_digest": content}))
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
    try:
        retry_locked(client.log_inputs, run_id, datasets=inputs)
    except Exception as e:
        # Two runs logging a dataset new to the experiment at the same moment (parallel trials): MLflow's store
        # looks the dataset up, then inserts it, and the slower insert hits the unique key. The dataset now
        # exists, so logging again links it to this run.
        if not any(text in str(e) for text in _DUPLICATE_KEY):
            raise
        retry_locked(client.log_inputs, run_id, datasets=inputs)


def confusion_figure(counts: torch.Tensor, title: str):
    """A labelled heat map of counts[true, predicted]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    ax.imshow(counts.log1p().numpy(), cmap="Blues")
    ax.grid(False)  # a style's grid (Optuna's plots leave ggplot's on) would run through the counts
    for t, p in counts.nonzero().tolist():  # zeros stay blank: the mistakes stand out
        ax.text(p, t, str(counts[t, p].item()), ha="center", va="center", fontsize=8,
                color="white" if t == p else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title=title)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    plt.close(fig)
    return fig

"""End to end through the real CLI (`python -m mnist_sweep`) on tiny synthetic IDX data, MLflow in tmp_path."""

import signal

import pytest
import torch

from conftest import cli_args, mlflow_runs, run_cli, signal_cli_when

pytestmark = pytest.mark.slow


def test_single_run_records_metrics_params_and_artifacts(tmp_path, mnist_root):
    result = run_cli(cli_args(tmp_path, mnist_root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout and "mlflow ui" in result.stdout
    assert "epoch 2/2" in result.stdout
    # per-epoch curves, step = epoch
    for key in ("train/loss", "val/loss", "val/acc", "lr", "epoch_seconds", "train/images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.data.metrics["test/acc"] > 0.8  # chance is 0.1: the synthetic classes are learnable
    assert run.data.metrics["model/params"] > 0
    assert run.data.params["model.conv1_channels"] == "8"
    assert run.data.params["optimizer._target_"] == "torch.optim.Adadelta"
    assert run.data.tags["device"] == "cpu" and run.data.tags["torch"] == torch.__version__
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.png", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/weights.pt", "model/model_config.json"}


def test_logged_weights_load_back_with_the_same_accuracy(tmp_path, mnist_root):
    from mnist_sweep.data import DataConfig, build_splits
    from mnist_sweep.tracking import load_model

    assert run_cli(cli_args(tmp_path, mnist_root, "trainer.epochs=1"), cwd=tmp_path).returncode == 0
    client, (run,) = mlflow_runs(tmp_path)
    model = load_model(client, run.info.run_id)
    splits = build_splits(DataConfig(root=str(mnist_root), download=False, val_size=200), torch.device("cpu"), 0)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in splits.test)
    assert correct / splits.num_test == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)


BAD_INPUTS = [
    ("model.conv1_channels=0", "model.conv1_channels=0 must be >= 1"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("data.val_size=1200", "data.val_size=1200 leaves no training data"),
    ("trainer.device=tpu", "trainer.device='tpu' is not a device"),
    ("trainer.precision=fp16", "trainer.precision='fp16' is not a precision"),
    ("optimized_metric=val/f1", "optimized_metric='val/f1' is not a metric"),
    ("optimizer.lr=-1", "optimizer: Invalid learning rate"),
    ("data.loader=turbo", "data.loader='turbo' is not a loader"),
    ("MISSING_DATA", "MNIST not found"),
    ("optimizer.lr=1e12", "training diverged: the loss became NaN/inf"),
    ("model.channels=3", "Could not override 'model.channels'"),
    ("model=huge", "Could not find 'model/huge'"),
    ("pruner=patient", "Could not find 'pruner/patient'"),
    ("hydra/sweeper/sampler=bayes", "Could not find 'hydra/sweeper/sampler/bayes'"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("trainer.device=cuda", "CUDA is not available"))


@pytest.mark.parametrize("override, message", BAD_INPUTS, ids=[o for o, _ in BAD_INPUTS])
def test_bad_input_fails_with_one_clear_message(tmp_path, mnist_root, override, message):
    extra = [f"data.root={tmp_path / 'empty'}"] if override == "MISSING_DATA" else [override]
    result = run_cli(cli_args(tmp_path, mnist_root, *extra), cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    _, runs = mlflow_runs(tmp_path)
    assert all(r.info.status != "RUNNING" for r in runs)
    if override == "optimizer.lr=1e12":  # died after MLflow started: recorded as failed, with the reason
        assert [r.info.status for r in runs] == ["FAILED"]
        assert "diverged" in runs[0].data.tags["end_reason"]
    else:  # refused before training: nothing recorded at all
        assert runs == []


def test_ctrl_c_marks_the_run_killed(tmp_path, mnist_root):
    def training():
        return any(r.info.status == "RUNNING" and "train/loss" in r.data.metrics for r in mlflow_runs(tmp_path)[1])

    code, stderr = signal_cli_when(cli_args(tmp_path, mnist_root, "trainer.epochs=200"), tmp_path, training,
                                   signal.SIGINT)
    assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr
    _, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("mode, key", [([], "hydra.run.dir"), (["--multirun"], "hydra.sweep.dir")])
def test_an_unwritable_output_folder_is_one_clear_error(tmp_path, mnist_root, mode, key):
    (tmp_path / "a-file").write_text("")
    proc = run_cli([*mode, *cli_args(tmp_path, mnist_root), f"{key}={tmp_path / 'a-file' / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 2 and f"error: {key}=" in proc.stderr and "not a writable folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()  # nothing started

"""End to end through the real CLI (`python -m mnist_sweep`) on tiny synthetic IDX data, MLflow in tmp_path."""

import importlib.metadata
import signal

import optuna
import pytest
import torch

from conftest import cli_args, mlflow_runs, run_cli, signal_cli_when
from mnist_sweep import machine, tracking

pytestmark = pytest.mark.slow


def test_single_run_records_metrics_params_and_artifacts_whose_weights_load_back(tmp_path, mnist_root):
    result = run_cli(cli_args(tmp_path, mnist_root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout and "mlflow ui" in result.stdout
    assert "epoch 2/2" in result.stdout
    # per-epoch curves, step = epoch
    for key in ("train/loss", "val/loss", "val/acc", "lr", "epoch_seconds", "train/images_per_s", "val_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.data.metrics["test/acc"] > 0.8  # chance is 0.1: the synthetic classes are learnable
    assert run.data.metrics["model/params"] > 0
    assert run.data.params["model.conv1_channels"] == "8"
    assert run.data.params["optimizer._target_"] == "torch.optim.Adadelta"
    tags = run.data.tags  # the environment, to tell a result from another machine apart (and to replay it)
    assert tags[tracking.DEVICE_TAG] == "cpu" and tags[tracking.THREADS_TAG] == "1"  # FAST: trainer.threads=1
    assert tags["version.torch"] == importlib.metadata.version("torch") and tags["version.optuna"] == optuna.__version__
    assert tags[tracking.CPU_TAG] == machine.cpu_model() and tags[tracking.CPU_FLAGS_TAG].split() == (
        machine.cpu_flags() or ["none"])
    assert set(tracking.ENVIRONMENT_TAGS) <= set(tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.png", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/weights.pt", "model/model_config.json"}
    # the logged weights load back with the same accuracy
    from mnist_sweep.data import DataConfig, build_splits
    from mnist_sweep.artifacts import load_model

    model = load_model(client, run.info.run_id)
    splits = build_splits(DataConfig(root=str(mnist_root), download=False, val_size=200), torch.device("cpu"), 0)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in splits.test)
    assert correct / splits.num_test == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)


# The CLI's side of a bad input: one `error:` line, exit 2, no traceback, nothing in MLflow. Every bad input's message
# is checked in-process (tests/test_bad_input.py); these two fail in build_spec and in prepare (no data).
# (and an unset variable in ${oc.env:...}, which Hydra resolves before any of the app's code runs)
UNSET_ENV = "mlflow.tracking_uri=${oc.env:MNIST_SWEEP_NO_SUCH_VARIABLE}"


@pytest.mark.parametrize("override", ["optimizer.lr=abc", "MISSING_DATA", UNSET_ENV],
                         ids=["optimizer.lr=abc", "MISSING_DATA", "UNSET_ENV"])
def test_a_bad_input_is_one_error_line_and_no_run(tmp_path, mnist_root, override):
    extra = f"data.root={tmp_path / 'empty'}" if override == "MISSING_DATA" else override
    result = run_cli(cli_args(tmp_path, mnist_root, extra), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    expected = {"optimizer.lr=abc": "error: optimizer.lr='abc' must be a number",
                "MISSING_DATA": f"error: MNIST not found: {tmp_path / 'empty' / 'MNIST' / 'raw'} lacks",
                UNSET_ENV: "error: mlflow.tracking_uri: the environment variable MNIST_SWEEP_NO_SUCH_VARIABLE that it "
                           "reads (${oc.env:MNIST_SWEEP_NO_SUCH_VARIABLE}) is not set; export it"}[override]
    assert line.startswith(expected)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the MLflow store was opened


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_is_marked_killed(tmp_path, mnist_root, sig, code, word):
    def training():
        return any(r.info.status == "RUNNING" and "train/loss" in r.data.metrics for r in mlflow_runs(tmp_path)[1])

    got, stderr = signal_cli_when(cli_args(tmp_path, mnist_root, "trainer.epochs=200"), tmp_path, training, sig)
    assert got == code and word in stderr and "Traceback" not in stderr
    _, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("mode, key", [([], "hydra.run.dir"), (["--multirun"], "hydra.sweep.dir")])
def test_an_unwritable_output_folder_is_one_clear_error(tmp_path, mnist_root, mode, key):
    (tmp_path / "a-file").write_text("")
    proc = run_cli([*mode, *cli_args(tmp_path, mnist_root), f"{key}={tmp_path / 'a-file' / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 2 and f"error: {key}=" in proc.stderr and "not a writable folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()  # nothing started

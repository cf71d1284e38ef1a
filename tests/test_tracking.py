"""MLflow records under faults of the place they are written to: a store locked by another process, a full disk."""

import errno
import resource
import signal
import sqlite3
import tempfile
import threading
import time

import pytest

from hydra_plugins.hydra_optuna_pruning_sweeper import _tracking
from mnist_sweep import artifacts, tracking
from mnist_sweep.errors import UserError
from mnist_sweep.model import ModelConfig, build_model
from mnist_sweep.tracking import RunRecorder, retry_locked


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(client, database file) of one SQLite MLflow store for the module: opening a new one takes seconds. Its
    artifacts go to ./mlruns, MLflow's default, so the module runs in the store's folder, not the checkout."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(db.parent)
        yield tracking.make_client(f"sqlite:///{db}"), db


def locked_error():
    from mlflow.exceptions import MlflowException

    return MlflowException("(sqlite3.OperationalError) database is locked")  # what MLflow raises after 20 s


def test_a_write_is_retried_while_the_store_is_locked():
    calls = []

    def write(value):
        calls.append(value)
        if len(calls) < 3:
            raise locked_error()
        return value

    assert retry_locked(write, 7) == 7 and calls == [7, 7, 7]


def test_a_lock_held_past_the_wait_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(_tracking, "LOCK_WAIT_S", 0.5)  # the sweeper plugin's, which retry_locked reads

    def write():
        raise locked_error()

    start = time.monotonic()
    with pytest.raises(UserError, match=r"MLflow tracking store \(mlflow\.tracking_uri\) stayed locked by another "
                                        r"process for 0\.5 s \(database is locked\)"):
        retry_locked(write)
    assert time.monotonic() - start < 2


def test_other_errors_are_not_retried():
    calls = []

    def write():
        calls.append(1)
        raise ValueError("no such run")

    with pytest.raises(ValueError):
        retry_locked(write)
    assert calls == [1]


def test_a_locked_store_is_waited_for(store):
    """Another process holds an exclusive lock on mlflow.db for 3 s: the run's writes wait, then succeed."""
    client, db = store
    with RunRecorder(client, "locked") as rec:
        holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        threading.Timer(3, lambda: (holder.execute("COMMIT"), holder.close())).start()
        start = time.monotonic()
        rec.log_params({"a": 1})
        rec.log_metrics({"val/acc": 0.5}, step=1)
        waited = time.monotonic() - start
    run = client.get_run(rec.run_id)
    assert waited > 2.5  # it was locked out, and waited rather than failed
    assert run.info.status == "FINISHED" and run.data.metrics["val/acc"] == 0.5 and run.data.params["a"] == "1"


def test_a_full_disk_while_saving_weights_fails_the_run_with_one_reason(store):
    """The file-size limit makes the OS refuse the weights file (EFBIG), as a full disk refuses it (ENOSPC)."""
    client, _ = store
    cfg = ModelConfig()  # 1.2M parameters: about 4.8 MB of weights
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with pytest.raises(UserError) as err, RunRecorder(client, "disk") as rec:
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
        try:
            artifacts.log_model_weights(rec, build_model(cfg), cfg)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
    assert str(err.value).startswith(f"no space left to save the model weights in {tempfile.gettempdir()} (File "
                                     "too large)")
    run = client.get_run(rec.run_id)
    assert run.info.status == "FAILED" and run.data.tags["end_reason"] == f"UserError: {err.value}"


def test_a_full_artifact_store_names_it(store, monkeypatch):
    client, _ = store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client, "log_artifacts", full)
    with pytest.raises(UserError) as err, RunRecorder(client, "disk") as rec:
        artifacts.log_model_weights(rec, build_model(ModelConfig(fc_width=8)), ModelConfig(fc_width=8))
    location = client.get_run(rec.run_id).info.artifact_uri
    assert str(err.value) == (f"no space left to save the model weights in {location} (No space left on device); "
                              "free space there and run again")


ROUND_TRIP = {"classic": ModelConfig(conv1_channels=4, conv2_channels=8, fc_width=16),
              "deep": ModelConfig(blocks=[[8, 8], [16]], batch_norm=True, fc_width=16)}


def logged_net(client, name: str, tta_shifts: int | None = None):
    """(net, run id) of a net whose weights are logged to a finished run, as a training run logs them."""
    import torch

    cfg = ROUND_TRIP[name]
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    with RunRecorder(client, "round trip") as rec:
        rec.log_params({"data.mean": 0.1307, "data.std": 0.3081})  # what predict and the registry normalize with
        if tta_shifts is not None:
            rec.log_params({tracking.TTA_SHIFTS_PARAM: tta_shifts})
        artifacts.log_model_weights(rec, net, cfg)
    return net, rec.run_id


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_predict_and_report_rebuild_a_logged_net_of_either_kind(store, name):
    """predict --run-id and the report rebuild a run's net from model/model_config.json and its weights."""
    import torch

    from mnist_sweep import predict

    client, _ = store
    net, run_id = logged_net(client, name)
    loaded = predict.load_model(client, run_id, None, "sqlite:///unused")
    assert type(loaded.net) is type(net) and (loaded.mean, loaded.std) == (0.1307, 0.3081)
    batch = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(batch), net(batch))


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_the_registry_registers_and_loads_a_net_of_either_kind(store, name):
    import torch

    from mnist_sweep import registry

    client, _ = store
    net, run_id = logged_net(client, name)
    version = registry.register_model(client, run_id, f"round_trip_{name}")
    registered, mean, std, shifts = registry.load_registered_model(client, f"round_trip_{name}", version.version)
    assert (mean, std, shifts) == (0.1307, 0.3081, 0)  # a run without test-time shifts
    batch = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(registered(batch), net(batch))


def test_a_run_tested_with_shifts_is_predicted_with_them_from_the_run_and_the_registry(store):
    """A run that validated and tested with trainer.tta_shifts scores predict's images (and the report's test set)
    the same way, whether loaded from its run or from its registered model."""
    import numpy as np
    import torch

    from mnist_sweep import predict, registry
    from mnist_sweep.data import background, shift

    client, _ = store
    net, run_id = logged_net(client, "classic", tta_shifts=2)
    loaded = predict.load_model(client, run_id, None, "sqlite:///unused")
    version = registry.register_model(client, run_id, "shifted")
    assert loaded.tta_shifts == registry.load_registered_model(client, "shifted", version.version)[3] == 2
    digits = list(np.random.default_rng(0).random((3, 28, 28), dtype=np.float32))
    probs = predict.classify(loaded.net, digits, loaded.mean, loaded.std, loaded.tta_shifts)
    x = (torch.from_numpy(np.stack(digits)).unsqueeze(1) - 0.1307) / 0.3081
    views = [x] + [shift(x, dy, dx, background(0.1307, 0.3081)) for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2))]
    with torch.no_grad():
        by_hand = torch.stack([net(v).softmax(1) for v in views]).mean(0)
        plain = net(x).softmax(1)
    torch.testing.assert_close(probs, by_hand)
    assert not torch.allclose(probs, plain)


def test_a_dataset_logged_by_two_runs_at_once_is_linked_to_both(store, mnist_root):
    """Parallel trials log the same new dataset at the same moment; MLflow's store looks it up, then inserts, so
    one of them hits the unique key (seen in CI on PostgreSQL). That run logs it again and is linked to it."""
    from types import SimpleNamespace

    from mlflow.exceptions import RestException

    from mnist_sweep.data import DataConfig

    client, _ = store
    exp = client.create_experiment("dataset_race")
    run_id = client.create_run(exp).info.run_id
    calls = []

    class RacingClient:  # the real client, whose first log_inputs loses the race as the server reports it
        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            if len(calls) == 1:
                raise RestException({"error_code": "BAD_REQUEST", "message": "(psycopg.errors.UniqueViolation) "
                                     "duplicate key value violates unique constraint \"dataset_pk\""})
            client.log_inputs(run_id, datasets=datasets)

    splits = SimpleNamespace(num_train=1000, num_val=200, num_test=300)
    artifacts.log_dataset(RacingClient(), run_id, DataConfig(root=str(mnist_root), download=False), splits)
    assert calls == [run_id, run_id]
    assert [d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs] == [artifacts.DATASET_NAME]

    class BrokenClient:
        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            raise RestException({"error_code": "BAD_REQUEST", "message": "experiment 7 does not exist"})

    calls.clear()
    with pytest.raises(RestException, match="does not exist"):
        artifacts.log_dataset(BrokenClient(), run_id, DataConfig(root=str(mnist_root), download=False), splits)
    assert calls == [run_id]  # only the race is retried

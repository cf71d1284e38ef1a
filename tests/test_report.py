"""The study report and the model registry, on the tiny recorded study (tests/conftest.py: recorded_study)."""

import base64

import pytest
import torch

from conftest import run_cli
from mnist_sweep import tracking

pytestmark = pytest.mark.slow


def uris(folder):
    return f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"


def test_report_writes_a_self_contained_page_and_logs_its_pngs(recorded_study, tmp_path):
    storage, tracking_uri = uris(recorded_study)
    out = tmp_path / "report"
    result = run_cli(["--storage", storage, "--tracking-uri", tracking_uri, "--data-root",
                      str(recorded_study / "data"), "--out", str(out)], cwd=tmp_path, module="mnist_sweep.report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study tiny: top 3 trials" in result.stdout and "best model on the test set: accuracy" in result.stdout
    expected = {"optimization_history.png", "param_importances.png", "parallel_coordinate.png",
                "intermediate_values.png", "confusion_matrix.png"}
    written = {p.name for p in out.glob("*.png")}
    assert expected <= written
    page = (out / "report.html").read_text()
    for name in written:  # every PNG is embedded, byte for byte: the page needs no other file
        assert base64.b64encode((out / name).read_bytes()).decode() in page
    assert "<td>tiny</td>" in page and "Leaderboard" in page
    client = tracking.make_client(tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id],
                                "tags.kind = 'study'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{n}" for n in written | {"report.html"}} <= logged


def test_report_names_the_studies_when_the_study_is_unknown(recorded_study, tmp_path):
    storage, tracking_uri = uris(recorded_study)
    result = run_cli(["--storage", storage, "--tracking-uri", tracking_uri, "--study", "nope"], cwd=tmp_path,
                     module="mnist_sweep.report")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --study 'nope' is not in {storage}; its studies: tiny"


def test_the_registered_best_model_loads_with_mlflow_and_predicts_like_the_net(recorded_study, monkeypatch):
    import mlflow
    import optuna

    storage, tracking_uri = uris(recorded_study)
    client = tracking.make_client(tracking_uri)
    version = tracking.latest_model_version(client, "mnist_sweep_best")
    best = optuna.load_study(study_name="tiny", storage=storage).best_trial
    assert str(version.version) == "1" and version.run_id == best.user_attrs["mlflow_run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    loaded = mlflow.pytorch.load_model("models:/mnist_sweep_best/1")
    net = tracking.load_model(client, version.run_id)
    batch = torch.randn(7, 1, 28, 28)
    torch.testing.assert_close(loaded(batch), net(batch))
    pyfunc = mlflow.pyfunc.load_model("models:/mnist_sweep_best/1")
    assert pyfunc.metadata.metadata == {"input_mean": 0.1307, "input_std": 0.3081, "output": "logits"}
    assert pyfunc.predict(batch.numpy()).shape == (7, 10)
    # a re-registration of the same run (a resumed sweep) keeps the version
    assert str(tracking.register_model(client, version.run_id, "mnist_sweep_best").version) == "1"

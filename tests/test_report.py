"""The study report and the model registry: its figures and errors on small in-memory studies (unit), and the
report, registry and MLflow records on the tiny recorded study (slow: tests/conftest.py's recorded_study)."""

import base64
import json

import matplotlib
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution

from conftest import run_cli
from hydra_plugins.hydra_optuna_pruning_sweeper import _results as results
from mnist_sweep import artifacts, registry, report, tracking
from mnist_sweep.errors import ConfigError

LONG_NAMES = {"model.conv1_channels": CategoricalDistribution([8, 16, 32]), "model.dropout": FloatDistribution(0.1, 0.6),
              "optimizer.weight_decay": FloatDistribution(1e-6, 1e-1, log=True)}


def small_study(n: int, storage=None, name: str = "small") -> optuna.Study:
    """n completed trials of two epochs each, over parameters whose names Optuna's plots shorten."""
    study = optuna.create_study(direction="maximize", storage=storage, study_name=name)
    for i in range(n):
        trial = study.ask(LONG_NAMES)
        for epoch in (1, 2):
            trial.report(0.5 + 0.04 * i + 0.01 * epoch, epoch)
        study.tell(trial, 0.5 + 0.04 * i + 0.02)
    return study


def uris(folder):
    return f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"


def test_figures_have_whole_trial_numbers_full_labels_and_a_caveat_for_few_trials():
    grid_before = matplotlib.rcParams["axes.grid"]
    figures = report.study_figures(small_study(3), ["val/acc"])
    assert matplotlib.rcParams["axes.grid"] == grid_before  # Optuna's ggplot style stays inside its plots
    for name in ("optimization_history.png", "intermediate_values.png"):
        ax = figures[name].axes[0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
        assert ax.get_ylabel() == "val/acc"
    texts = [t.get_text() for t in figures["param_importances.png"].texts]
    assert any("only 3 completed trials" in t for t in texts)
    labels = figures["parallel_coordinate.png"].axes[0].get_xticklabels()
    assert [label.get_text() for label in labels] == ["val/acc", *sorted(LONG_NAMES)]  # Optuna cut them at 17
    assert all(label.get_rotation() == 0 for label in labels)


def test_importances_of_enough_trials_carry_no_caveat():
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    results.tidy_figures({"param_importances.png": fig}, "val/acc", completed=results.FEW_TRIALS)
    assert fig.texts == []


def test_the_sweeps_summary_draws_importances_only_from_enough_trials():
    few, enough = small_study(results.FEW_TRIALS - 1, name="few"), small_study(results.FEW_TRIALS, name="enough")
    assert "param_importances.png" not in results.history_figures(few, importances_from=results.FEW_TRIALS)
    assert "param_importances.png" in results.history_figures(enough, importances_from=results.FEW_TRIALS)
    assert "param_importances.png" in results.history_figures(few)  # the report draws them, with the caveat


def test_the_confusion_matrix_has_no_grid_even_under_optunas_ggplot_style():
    import matplotlib.pyplot as plt

    with plt.style.context("ggplot"):  # what Optuna's plots leave behind in a training process
        fig = artifacts.confusion_figure(torch.eye(10, dtype=torch.long) * 30, "test")
    ax = fig.axes[0]
    assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())


@pytest.mark.parametrize("name", ["/tmp/x", "../../x", "a/b", "a\\b", "", "  ", ".", ".."])
def test_a_study_name_that_is_a_path_is_refused(name):
    with pytest.raises(ConfigError, match="is not a study name"):
        report.check_study_name(name)


def test_a_study_name_is_kept():
    assert report.check_study_name("default_3f2a9c") == "default_3f2a9c"
    assert report.check_study_name("v1..v2") == "v1..v2"  # dots inside a name are no path step


def test_report_refuses_a_path_as_study_before_writing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report.main(["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--study", "../../x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --study='../../x' is not a study name: it names a folder under outputs/reports/, so it "
                   "must be non-empty, without '/' or '\\', and not '.' or '..'"]
    assert list(tmp_path.iterdir()) == []


def test_report_on_a_missing_mlflow_store_is_one_line_and_creates_none(tmp_path, monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    small_study(1, storage).set_user_attr("mlflow_parent_run_id", "0" * 32)
    monkeypatch.chdir(tmp_path)
    assert report.main(["--storage", storage, "--tracking-uri", "sqlite:///mlflow.db", "--no-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --tracking-uri sqlite:///mlflow.db: no MLflow store there ({tmp_path / 'mlflow.db'} "
                   "does not exist); run this where the sweep ran, or pass --tracking-uri with the sweep's "
                   "mlflow.tracking_uri"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_registering_leaves_the_process_tracking_uri_as_it_was(monkeypatch):
    import os

    import mlflow

    for user_value in (None, "sqlite:///users.db"):
        if user_value:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", user_value)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with registry.process_tracking_uri("sqlite:///sweep.db"):
            assert mlflow.get_tracking_uri() == "sqlite:///sweep.db"
        assert os.environ.get("MLFLOW_TRACKING_URI") == user_value
        assert mlflow.is_tracking_uri_set() == bool(user_value)


def test_the_data_digest_changes_with_one_pixel():
    from mnist_sweep.data import MnistArrays, digest

    images, labels = torch.zeros(4, 28, 28, dtype=torch.uint8), torch.arange(4)
    arrays = MnistArrays(images, labels, images[:2], labels[:2])
    changed = images.clone()
    changed[3, 5, 5] = 1
    assert len(digest(arrays)) == 16 and digest(arrays) == digest(MnistArrays(images.clone(), labels, images[:2],
                                                                              labels[:2]))
    assert digest(MnistArrays(changed, labels, images[:2], labels[:2])) != digest(arrays)


@pytest.mark.slow
def test_report_writes_a_self_contained_page_and_logs_its_pngs(recorded_study, tmp_path):
    storage, tracking_uri = uris(recorded_study)
    out = tmp_path / "report"
    result = run_cli(["--storage", storage, "--tracking-uri", tracking_uri, "--data-root",
                      str(recorded_study / "data"), "--out", str(out)], cwd=tmp_path, module="mnist_sweep.report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Downloading artifacts" not in result.stderr  # MLflow's progress bars are off in our commands
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


@pytest.mark.slow
def test_report_names_the_studies_when_the_study_is_unknown(recorded_study, tmp_path):
    storage, tracking_uri = uris(recorded_study)
    result = run_cli(["--storage", storage, "--tracking-uri", tracking_uri, "--study", "nope"], cwd=tmp_path,
                     module="mnist_sweep.report")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --study 'nope' is not in {storage}; its studies: tiny"


@pytest.mark.slow
def test_the_registered_best_model_loads_with_mlflow_and_predicts_like_the_net(recorded_study, monkeypatch):
    import mlflow
    import optuna

    storage, tracking_uri = uris(recorded_study)
    client = tracking.make_client(tracking_uri)
    version = registry.latest_model_version(client, "mnist_sweep_best")
    best = optuna.load_study(study_name="tiny", storage=storage).best_trial
    assert str(version.version) == "1" and version.run_id == best.user_attrs["mlflow_run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    loaded = mlflow.pytorch.load_model("models:/mnist_sweep_best/1")
    net = artifacts.load_model(client, version.run_id)
    batch = torch.randn(7, 1, 28, 28)
    torch.testing.assert_close(loaded(batch), net(batch))
    pyfunc = mlflow.pyfunc.load_model("models:/mnist_sweep_best/1")
    assert pyfunc.metadata.metadata == {"input_mean": 0.1307, "input_std": 0.3081, "output": "logits", "tta_shifts": 0}
    assert pyfunc.predict(batch.numpy()).shape == (7, 10)
    # a re-registration of the same run (a resumed sweep) keeps the version
    assert str(registry.register_model(client, version.run_id, "mnist_sweep_best").version) == "1"


@pytest.mark.slow
def test_the_registered_version_is_a_logged_model_of_its_run(recorded_study):
    _, tracking_uri = uris(recorded_study)
    client = tracking.make_client(tracking_uri)
    version = registry.latest_model_version(client, "mnist_sweep_best")
    run = client.get_run(version.run_id)
    [output] = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert version.source == f"models:/{logged.model_id}" and logged.source_run_id == run.info.run_id
    assert logged.name == registry.LOGGED_MODEL_NAME and logged.status.name == "READY"
    assert logged.experiment_id == run.info.experiment_id  # the Models tab of the sweep's experiment lists it
    assert "test/acc" in {m.key for m in logged.metrics}  # the run's test score is linked to the model
    assert run.info.status == "FINISHED"  # logging into the finished run did not reopen it
    registered = client.get_registered_model("mnist_sweep_best")
    assert registered.description == registry.REGISTERED_MODEL_DESCRIPTION


@pytest.mark.slow
def test_training_runs_record_their_dataset_source_and_environment(recorded_study):
    from conftest import mlflow_runs

    from mnist_sweep.data import digest, load_mnist

    _, runs = mlflow_runs(recorded_study)
    trials = [r for r in runs if "trial_number" in r.data.tags]
    assert len(trials) == 3
    files_digest = digest(load_mnist(str(recorded_study / "data"), download=False))
    for run in trials:
        assert run.data.tags["mlflow.source.name"] == "mnist_sweep"
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert set(tracking.ENVIRONMENT_TAGS) <= set(run.data.tags)  # a trial's run too (replay.py reads them)
        [used] = run.inputs.dataset_inputs
        assert used.dataset.name == "mnist" and len(used.dataset.digest) == 16
        assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "training"}
        profile = json.loads(used.dataset.profile)
        assert profile == {"train": 1000, "val": 200, "test": 300, "files_digest": files_digest}
    assert len({r.inputs.dataset_inputs[0].dataset.digest for r in trials}) == 1  # same files, same split


@pytest.mark.slow
def test_report_on_a_store_without_the_studys_runs_is_one_line(recorded_study, tmp_path, capsys):
    _, tracking_uri = uris(recorded_study)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    small_study(1, storage).set_user_attr("mlflow_parent_run_id", "0" * 32)
    assert report.main(["--storage", storage, "--tracking-uri", tracking_uri, "--no-model",
                        "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: study 'small' was recorded in an MLflow store that --tracking-uri {tracking_uri} is not: its "
        f"parent run {'0' * 32} is not there; pass --tracking-uri with the sweep's mlflow.tracking_uri"]

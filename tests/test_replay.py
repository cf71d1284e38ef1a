"""`python -m mnist_sweep.replay`: the pure parts (comparison, environment warnings, the logged config), a run
re-trained from its config.yaml to the last digit, a sweep's trial replayed as a plain single run, and the runs
that cannot be replayed (one `error:` line each)."""

import shutil
from dataclasses import replace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, cli_args, free_port, mlflow_runs, run_cli
from mnist_sweep import replay, tracking
from mnist_sweep.config import build_spec, logged_spec
from mnist_sweep.errors import ConfigError
from mnist_sweep.replay import Row, compare, environment_differences, replay_threads


def test_metrics_are_compared_at_the_originals_last_step():
    """A pruned trial logged val/acc up to epoch 2 and no test/acc; its replay trains all 3 epochs."""
    rows = compare({"val/acc": {1: 0.5, 2: 0.75}, "test/acc": {}},
                   {"val/acc": {1: 0.5, 2: 0.75, 3: 0.8}, "test/acc": {3: 0.9}})
    assert rows == [Row("val/acc", 2, 0.75, 0.75), Row("test/acc", None, None, None)]
    assert rows[0].identical and not rows[1].identical
    assert not Row("test/acc", 3, 0.75, 0.7500000000000001).identical  # the last digit counts
    assert "0.7500000000000001" in replay.comparison_table([Row("test/acc", 3, 0.75, 0.7500000000000001)])


def test_environment_differences_name_the_tag_and_both_values():
    same = {tag: "x" for tag in tracking.ENVIRONMENT_TAGS}
    assert environment_differences(same, dict(same)) == []
    changed = same | {tracking.VERSION_TAGS["torch"]: "2.15.0", tracking.THREADS_TAG: "2"}
    assert environment_differences(same, changed) == [
        "version.torch differs: 'x' in the original, '2.15.0' in the replay",
        "torch_threads differs: 'x' in the original, '2' in the replay"]
    older = {tracking.DEVICE_TAG: "cuda", tracking.GIT_COMMIT_TAG: "x"}  # a run made before the version tags
    assert environment_differences(older, same) == [
        "device differs: 'cuda' in the original, 'x' in the replay",
        "the original run recorded no version.torch, version.torchvision, version.hydra-core, version.optuna, "
        "version.mlflow, cpu, cpu_flags, torch_threads (it predates these tags): a difference there would go "
        "unnoticed"]


@pytest.mark.parametrize("tags, config_threads, expected", [
    ({tracking.THREADS_TAG: "1"}, 0, 1),  # a sweep's trial with one thread: replayed with one
    ({tracking.THREADS_TAG: "1"}, 2, None),  # trainer.threads=2 in the config: prepare sets those
    ({}, 0, None)])  # recorded nothing: torch's default
def test_the_replay_trains_with_the_originals_threads(tags, config_threads, expected):
    assert replay_threads(tags, config_threads) == expected


def test_a_logged_config_builds_the_spec_its_run_trained():
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["model=deep", "scheduler=onecycle", "data.root=/x"])
    logged = OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))  # what run.train_and_record logs
    spec, resolved = logged_spec(logged, data_root="/elsewhere")
    expected = build_spec(cfg)
    assert spec.model == expected.model and spec.model.blocks == ((32, 32), (64, 64))
    assert spec.trainer == expected.trainer and spec.data == replace(expected.data, root="/elsewhere")
    assert resolved["data"]["root"] == "/elsewhere" and resolved["scheduler"]["max_lr"] == cfg.optimizer.lr
    with pytest.raises(ConfigError, match="not the mapping of a run's config"):
        logged_spec("- a\n- list\n")


def new_runs(tmp_path, before):
    _, runs = mlflow_runs(tmp_path)
    return [r for r in runs if r.info.run_id not in before]


@pytest.mark.slow
def test_a_deterministic_cpu_run_replays_to_the_last_digit(tmp_path, mnist_root, capsys):
    """A run through the CLI (fp32 on the CPU, deterministic, with augmentation and dropout), then its replay from
    the MLflow store: a new run, tagged with the original's id, whose metrics are the same floats."""
    result = run_cli(cli_args(tmp_path, mnist_root, "trainer.deterministic=true", "data.max_shift=2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (original,) = mlflow_runs(tmp_path)
    assert replay.main([original.info.run_id, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    out = capsys.readouterr()
    (copy,) = new_runs(tmp_path, {original.info.run_id})
    assert copy.data.tags[tracking.REPLAY_OF_TAG] == original.info.run_id and copy.info.status == "FINISHED"
    assert copy.info.run_name == f"replay-{original.info.run_name}"
    for metric in ("val/acc", "test/acc", "val/loss", "test/loss", "train/loss"):
        assert copy.data.metrics[metric] == original.data.metrics[metric], metric
    for tag in tracking.ENVIRONMENT_TAGS:
        assert copy.data.tags[tag] == original.data.tags[tag], tag
    assert f"identical: yes (run {original.info.run_id} replayed as run {copy.info.run_id})" in out.out
    assert f"val/acc       2  {original.data.metrics['val/acc']!r}" in out.out
    assert "epoch 2/2" in out.out and "warning" not in out.err  # the same machine and code: nothing to warn of


@pytest.mark.slow
def test_a_trial_of_a_sweep_replays_as_a_plain_single_run(recorded_study, tmp_path, capsys):
    shutil.copy(recorded_study / "mlflow.db", tmp_path / "mlflow.db")  # the replay's run goes into the copy
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, runs = mlflow_runs(tmp_path)
    trial = next(r for r in runs if "test/acc" in r.data.metrics and tracking.TRIAL_NUMBER_TAG in r.data.tags)
    number = trial.data.tags[tracking.TRIAL_NUMBER_TAG]
    assert replay.main(["--study", "tiny", "--trial", number, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"replaying run {trial.info.run_id} 'trial-{number}' (trial {number} of study tiny)" in out
    (copy,) = new_runs(tmp_path, {r.info.run_id for r in runs})
    assert copy.data.tags[tracking.REPLAY_OF_TAG] == trial.info.run_id
    for sweep_tag in (tracking.PARENT_TAG, tracking.STUDY_TAG, tracking.TRIAL_NUMBER_TAG, tracking.TRIAL_STATE_TAG):
        assert sweep_tag not in copy.data.tags, sweep_tag  # not nested, not a trial: a plain single run
    assert copy.data.metrics["test/acc"] == trial.data.metrics["test/acc"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(URI, a run of another program, a study's parent run) of one SQLite MLflow store."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('replay') / 'mlflow.db'}"
    client = tracking.make_client(uri)
    with tracking.RunRecorder(client, "other") as other:
        other.log_params({"a": 1})
    study_tags = {tracking.STUDY_TAG: "tiny", tracking.KIND_TAG: tracking.STUDY_KIND}
    with tracking.RunRecorder(client, "sweeps", run_name="tiny", tags=study_tags) as parent:
        pass
    return uri, other.run_id, parent.run_id


CASES = {  # a bad way to name the run -> (arguments, the start of the error line); {uri}, {other}, {parent}, {tmp}
    "unknown run id": (["0123abcd", "--tracking-uri", "{uri}"], "no MLflow run '0123abcd' in {uri} ("),
    "a run without config.yaml": (["{other}", "--tracking-uri", "{uri}"],
                                  "MLflow run {other} has no readable config.yaml artifact to replay it from ("),
    "a study's parent run": (["{parent}", "--tracking-uri", "{uri}"],
                             "MLflow run {parent} is the parent run of study 'tiny', which trained nothing; replay "
                             "one of its trials: --study tiny --trial N, or a trial's run id"),
    "unknown trial": (["--study", "tiny", "--trial", "7", "--tracking-uri", "{uri}"],
                      "--study tiny --trial 7: no such trial's run in {uri}; pass --tracking-uri"),
    "no store there": (["{other}", "--tracking-uri", "sqlite:///{tmp}/none.db"],
                       "--tracking-uri sqlite:///{tmp}/none.db: no MLflow store there"),
    "an unreachable server": (["{other}", "--tracking-uri", "http://127.0.0.1:{port}"],
                              "MLflow tracking server 'http://127.0.0.1:{port}' (--tracking-uri) cannot be reached"),
    "no run named": (["--tracking-uri", "{uri}"], "name the run to replay: a run id, or --study NAME --trial N"),
    "both named": (["{other}", "--study", "tiny", "--trial", "1"], "name the run to replay"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_run_that_cannot_be_replayed_is_one_error_line(store, tmp_path, capsys, case):
    uri, other, parent = store
    names = {"uri": uri, "other": other, "parent": parent, "tmp": tmp_path, "port": free_port()}
    argv, expected = CASES[case]
    assert replay.main([a.format(**names) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(**names)), lines
    client = tracking.make_client(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.{tracking.REPLAY_OF_TAG} != ''")  # no replay's run was made

"""Sweeps through the real CLI (`python -m mnist_sweep --multirun`) on tiny synthetic data: trial counts,
MLflow nesting, pruning, resume, crash recovery, the joblib launcher, failures and multi-objective studies."""

import os
import signal
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import cli_args, migrated_mlflow_store, mlflow_runs, run_cli, signal_cli_when

pytestmark = pytest.mark.slow

# a sweep over two plain values on the tiny data; the default space would be slower and is tested for composition
SPACE = ["~hparams_search", "model.dropout=interval(0.1,0.6)", "optimizer.lr=tag(log,interval(0.1,1.0))"]


def sweep_args(tmp_path, mnist_root, *extra):
    migrated_mlflow_store(tmp_path)
    return ["--multirun", *cli_args(tmp_path, mnist_root, "trainer.epochs=1"),
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", "hydra.sweeper.study_name=s",
            f"hydra.sweeper.best_config_dir={tmp_path / 'configs'}", *extra]


def load(tmp_path, name="s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def study_and_runs(tmp_path, name="s"):
    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return load(tmp_path, name), client, parents, children


def test_sweep_runs_its_trials_each_nested_under_one_parent(tmp_path, mnist_root):
    """Also the README's multi-worker pattern: the storage as a group choice and one of its values, given to the
    sweep on its command line, stays out of the best config."""
    args = [a for a in sweep_args(tmp_path, mnist_root, *SPACE, "hydra.sweeper.n_trials=3")
            if not a.startswith("hydra.sweeper.storage=")]
    result = run_cli([*args, "storage=sqlite", f"storage.url=sqlite:///{tmp_path / 'optuna.db'}",
                      "data.max_rotation=2.5"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study, client, parents, children = study_and_runs(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.data.tags["trial_state"] == "COMPLETE" for c in children)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {c.info.run_id for c in children}
    # the parent: study params, best value and params, trial counts, plots
    assert parent.data.params["study"] == "s" and "space.model.dropout" in parent.data.params
    assert parent.data.metrics["best/val/acc"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials/complete"] == 3
    assert float(parent.data.tags["best.model.dropout"]) == pytest.approx(study.best_params["model.dropout"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "optimization_results.yaml"} <= artifacts
    assert "param_importances.png" not in artifacts  # 3 trials: noise (tests/test_report.py has the rule)
    # the plugin's results file, and a loadable experiment config for the best trial
    (results_file,) = (tmp_path / "outputs" / "sweep").glob("optimization_results.yaml")
    results = yaml.safe_load(results_file.read_text())
    assert results["best_value"] == pytest.approx(study.best_value)
    text = (tmp_path / "configs" / "experiment" / "s_best.yaml").read_text()
    best = yaml.safe_load(text)
    assert best["model"]["dropout"] == pytest.approx(study.best_params["model.dropout"])
    assert "\\" not in text and best["data"]["root"] == str(mnist_root)  # no Hydra escaping left in values
    assert best["data"]["max_rotation"] == 2.5 and "storage" not in best and "override /storage" not in text
    assert "override /model: small" in text
    assert "mnist-sweep experiment=s_best" in result.stdout + result.stderr
    # what the user reads: one line per trial end, no internals, child runs named after their trials
    out = result.stdout + result.stderr
    assert "trial 2 (3/3) COMPLETE val/acc" in out and "best so far #" in out
    assert "MNIST_SWEEP" not in out and "env_set" not in out and "See it with" not in out
    assert sorted(c.info.run_name for c in children) == ["trial-0", "trial-1", "trial-2"]
    assert study.metric_names == ["val/acc"]
    # the best trial's experiment config composes back into its settings
    job = run_cli([f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "experiment=s_best", "--cfg", "job"],
                  cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-2000:]
    assert f"dropout: {study.best_params['model.dropout']}" in job.stdout


def test_resume_continues_the_same_study_to_its_total_budget(tmp_path, mnist_root):
    """Without a study_name the study is named from its space and fixed overrides, not from n_trials: the same
    command with a larger budget finds it again."""
    def args(n_trials: int) -> list[str]:
        return [a for a in sweep_args(tmp_path, mnist_root, *SPACE, f"hydra.sweeper.n_trials={n_trials}")
                if not a.startswith("hydra.sweeper.study_name")]

    first = run_cli(args(3), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(args(5), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")
    name = summary.study_name
    assert name.startswith("default-")
    study, _, parents, children = study_and_runs(tmp_path, name)
    assert len(study.trials) == 5 and all(t.state == TrialState.COMPLETE for t in study.trials)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == 5  # the seeded sampler did not replay the first invocation's proposals
    assert len(parents) == 1 and len(children) == 5
    # a third run with the budget already spent runs nothing, says how to extend it, and leaves nothing behind
    sweep_dir = tmp_path / "outputs" / "sweep"
    for f in sweep_dir.iterdir():
        f.unlink() if f.is_file() else None
    third = run_cli(args(5), cwd=tmp_path)
    assert third.returncode == 0 and len(load(tmp_path, name).trials) == 5
    assert "has used its budget (5/5 trials)" in third.stdout + third.stderr
    assert "hydra.sweeper.n_trials=7" in third.stdout + third.stderr
    assert "registered" not in third.stdout + third.stderr
    _, _, parents_after, _ = study_and_runs(tmp_path, name)
    assert [p.info.status for p in parents_after] == ["FINISHED"]
    assert not any(sweep_dir.glob("*.yaml"))
    # resumed by its name with another objective (val/loss on a val/acc study), the losses would be ranked as
    # accuracies and the wrong trial become the best config and the registered model: refused before any trial
    again = run_cli([*args(7), "optimized_metric=val/loss", f"hydra.sweeper.study_name={name}"], cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"error: study '{name}' optimizes val/acc (maximize); this sweep asks for val/loss (minimize)" \
        in again.stderr
    study = load(tmp_path, name)
    assert len(study.trials) == 5 and study.metric_names == ["val/acc"]


def test_joblib_launcher_runs_trials_in_parallel_processes_and_prunes_the_hopeless(tmp_path, mnist_root):
    # half the space cannot learn (Adadelta at lr 1e-6): the median pruner stops those after epoch 1.
    # Random sampler, seed 0, draws lr = 1, 1e-6, 1, 1, 1e-6, 1e-6: hopeless trials meet finished ones
    result = run_cli(sweep_args(tmp_path, mnist_root, "~hparams_search", "optimizer.lr=choice(1e-6,1.0)",
                                "trainer.epochs=3", "hydra.sweeper.n_trials=6", "hydra/sweeper/sampler=random",
                                "hydra.sweeper.sampler.seed=0", "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
                                "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the app's local_workers: true leaves joblib its batches: it brings its own processes
    assert "runs batches of n_jobs trials" in result.stdout + result.stderr
    study, _, parents, children = study_and_runs(tmp_path)
    assert len(study.trials) == 6 and len(children) == 6 and len(parents) == 1
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["optimizer.lr"] == 1e-6 for t in pruned), [(t.params, t.state) for t in study.trials]
    assert all(len(t.intermediate_values) < 3 for t in pruned)
    client, _ = mlflow_runs(tmp_path)
    runs = {c.info.run_id: c for c in children}
    for t in pruned:  # a pruned trial's run says so, and keeps its curve up to the cut
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["trial_state"] == "PRUNED" and run.info.status == "FINISHED"
        assert "pruned at step" in run.data.tags["end_reason"]
        assert client.get_metric_history(run.info.run_id, "val/acc")
    assert study.best_trial.params["optimizer.lr"] == 1.0
    # 2 jobs on this machine's cores: each job got cores // 2 torch threads
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert {c.data.params["trainer.threads"] for c in children} == {str(expected)}


def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path, mnist_root):
    result = run_cli(sweep_args(tmp_path, mnist_root, "~hparams_search", "optimizer.lr=choice(1.0,1e12)",
                                "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=grid",
                                "hydra.sweeper.max_failure_rate=0.6"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    states = {t.params["optimizer.lr"]: t.state for t in study.trials}
    assert states == {1.0: TrialState.COMPLETE, 1e12: TrialState.FAIL}  # the grid has 2 points: 2 trials
    failed = [t for t in study.trials if t.state == TrialState.FAIL][0]
    assert "training diverged" in failed.user_attrs["fail_reason"]


def test_a_config_error_stops_the_sweep_at_the_first_trial(tmp_path, mnist_root):
    result = run_cli(sweep_args(tmp_path, mnist_root, *SPACE, "model.conv1_channels=0", "hydra.sweeper.n_trials=4"),
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "model.conv1_channels=0 must be >= 1" in result.stderr and "Traceback" not in result.stderr
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.FAIL
    _, _, parents, _ = study_and_runs(tmp_path)
    assert parents[0].info.status == "FAILED"


def test_a_sweep_without_a_search_space_is_refused(tmp_path, mnist_root):
    """hparams_search=none and nothing swept on the command line: every trial would train the same config."""
    result = run_cli(sweep_args(tmp_path, mnist_root, "hparams_search=none"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: nothing to search: hydra.sweeper.params is empty" in result.stderr
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was made


def test_bad_search_space_syntax_is_a_clear_error(tmp_path, mnist_root):
    result = run_cli(sweep_args(tmp_path, mnist_root, "~hparams_search", "model.dropout=interval(0.6)",
                                "hydra.sweeper.n_trials=2"), cwd=tmp_path)
    assert result.returncode != 0
    assert "model.dropout" in result.stderr and "Traceback" not in result.stderr


def test_multi_objective_study_gives_a_pareto_front(tmp_path, mnist_root):
    result = run_cli(sweep_args(tmp_path, mnist_root, "~hparams_search", "model.fc_width=choice(8,64)",
                                "model.dropout=interval(0.1,0.5)", "optimized_metric=[val/acc,model/params]",
                                "hydra.sweeper.n_trials=4"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    (results_file,) = (tmp_path / "outputs" / "sweep").glob("optimization_results.yaml")
    solutions = yaml.safe_load(results_file.read_text())["solutions"]
    assert solutions and all(len(s["values"]) == 2 for s in solutions)
    assert {s["values"][1] for s in solutions} <= {t.values[1] for t in study.trials}


def test_a_killed_sweep_leaves_no_trial_running_after_a_rerun(tmp_path, mnist_root):
    fast_beat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]
    args = sweep_args(tmp_path, mnist_root, *SPACE, "hydra.sweeper.n_trials=2", *fast_beat)
    long_args = [a if a != "trainer.epochs=1" else "trainer.epochs=40" for a in args]

    def trial_0_training():
        trial = load(tmp_path).trials[0]
        return trial.state == TrialState.RUNNING and trial.intermediate_values

    signal_cli_when(long_args, tmp_path, trial_0_training, signal.SIGKILL)
    assert load(tmp_path).trials[0].state == TrialState.RUNNING  # what the kill left behind
    time.sleep(3)  # longer than the grace period: its heartbeat is stale now
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study, _, _, children = study_and_runs(tmp_path)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert states[0] == TrialState.FAIL  # the killed trial, re-queued once with the same params
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == study.trials[0].params
    assert sum(s == TrialState.COMPLETE for s in states) == 2  # the budget is still met
    assert all(c.info.status != "RUNNING" for c in children)
    killed = [c for c in children if c.data.tags["trial_number"] == "0"]
    assert killed[0].info.status == "KILLED"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_stops_cleanly_and_reruns_the_trial_once(tmp_path, mnist_root, sig):
    args = sweep_args(tmp_path, mnist_root, *SPACE, "hydra.sweeper.n_trials=2")
    long_args = [a if a != "trainer.epochs=1" else "trainer.epochs=200" for a in args]
    code, stderr = signal_cli_when(long_args, tmp_path, lambda: load(tmp_path).trials[0].intermediate_values, sig)
    word = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert code == (130 if sig == signal.SIGINT else 143) and word in stderr and "Traceback" not in stderr
    study, _, parents, children = study_and_runs(tmp_path)
    trial, retry = study.trials  # the interrupted trial, and its parameters queued again
    assert trial.state == TrialState.FAIL and word.split()[0] in trial.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == trial.params
    assert [c.info.status for c in children] == ["KILLED"]
    assert parents[0].info.status == "KILLED"
    if sig == signal.SIGTERM:  # resuming runs the queued parameters once, then one new trial: the budget of 2
        result = run_cli(args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        study = load(tmp_path)
        assert [t.state for t in study.trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2
        assert study.trials[1].params == trial.params


def test_a_plain_hydra_grid_runs_with_the_basic_sweeper(tmp_path, mnist_root):
    args = [a for a in cli_args(tmp_path, mnist_root, "trainer.epochs=1") if not a.startswith("hydra.sweeper.")]
    result = run_cli(["--multirun", *args, "hydra/sweeper=basic",
                      "hparams_search=none", "trainer.seed=1,2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    assert sorted(r.data.params["trainer.seed"] for r in runs) == ["1", "2"]


def test_a_job_that_returns_no_number_fails_its_trial_and_the_sweep_goes_on(tmp_path):
    """A foreign Hydra app on this sweeper whose task returns None or a word for some points, and a numpy scalar
    (what a metric computed with numpy is) for another: that one counts, as upstream counts it."""
    (tmp_path / "app.py").write_text(
        "import hydra\n"
        "@hydra.main(config_path='.', config_name='config')\n"
        "def main(cfg):\n"
        "    import numpy\n"
        "    return {1: 0.5, 2: None, 3: 'abc', 4: numpy.float32(0.25)}[cfg.x]\n"
        "if __name__ == '__main__':\n"
        "    main()\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "defaults": [{"override hydra/sweeper": "optuna_pruning"}, {"override hydra/sweeper/sampler": "grid"},
                     "_self_"],
        "x": 1,
        "hydra": {"sweeper": {"params": {"x": "choice(1,2,3,4)"}, "n_trials": 4, "max_failure_rate": 1.0,
                              "study_name": "f", "storage": f"sqlite:///{tmp_path / 'optuna.db'}"},
                  "sweep": {"dir": str(tmp_path / "sweep")}}}))
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "app.py", "--multirun"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path, "f")
    by_x = {t.params["x"]: t for t in study.trials}
    assert by_x[1].state == TrialState.COMPLETE and by_x[1].value == 0.5
    assert by_x[4].state == TrialState.COMPLETE and by_x[4].value == 0.25
    for x, kind in ((2, "NoneType"), (3, "str")):
        reason = by_x[x].user_attrs["fail_reason"]
        assert by_x[x].state == TrialState.FAIL and f"of type {kind}, which float() cannot convert" in reason
        assert reason.startswith(f"trial {by_x[x].number}: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.n_trials=abc", "error: hydra.sweeper.n_trials='abc' must be an integer"),
    ("mlflow.experiment=''", "error: hydra.sweeper.mlflow.experiment='' must be a non-empty name"),
])
def test_bad_sweeper_settings_are_one_line(tmp_path, mnist_root, override, message):
    result = run_cli(sweep_args(tmp_path, mnist_root, *SPACE, override), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert [r for r in mlflow_runs(tmp_path)[1]] == []  # no parent run was made

"""`hydra/sweeper=optuna_pruning` as any Hydra app uses it: tiny apps written into a folder outside this repo,
returning in milliseconds, run as their users run them (`python app.py --multirun ...`).

First the upstream hydra-optuna-sweeper's documented behaviours (our own apps, in the spirit of its example/
sphere, multi-objective and custom-search-space apps): the grammar, the samplers, multi-objective, grid, n_jobs,
the failure rate. Then what this plugin adds: pruning from inside the job with every launcher, resume to a total
budget, and MLflow runs a plain `mlflow.start_run()` logs into."""

import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from hydra_plugins.hydra_optuna_pruning_sweeper import time_spent

from conftest import run_sweep, write_app

pytestmark = pytest.mark.slow

APP = '''
import time

import hydra
from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial


@hydra.main(config_path=".", config_name="config")
def objective(cfg):
    if cfg.x == cfg.fail_at:
        raise RuntimeError("asked to fail")
    if cfg.objectives == 2:  # two conflicting goals: a Pareto front
        return [cfg.x ** 2 + cfg.y ** 2, (cfg.x - 2) ** 2 + (cfg.y - 2) ** 2]
    value = (cfg.x - 1) ** 2 + cfg.y ** 2 + cfg.get("w", 0)
    trial = current_trial()  # a no-op outside a sweep
    for step in range(1, cfg.steps + 1):  # a learning curve that ends at `value`: a bad trial is bad early
        # the last step is recorded, never pruned: the work is done (without `last`, a trial whose first steps
        # came before any other trial had finished would be pruned at its end, as the timing of the jobs falls)
        time.sleep(cfg.get("sleep", 0))  # seconds of work per step
        trial.report(value + 1.0 / step, step, last=step == cfg.steps)
    if cfg.log_mlflow:
        import mlflow

        with mlflow.start_run():  # lands in this trial's run: the sweeper hands over MLFLOW_RUN_ID
            mlflow.log_metric("value", value)
    return value


def widen(cfg, trial):  # custom_search_space: a parameter that depends on another one
    trial.suggest_float("+w", 0.0, abs(trial.params["x"]))


if __name__ == "__main__":
    objective()
'''


def make_app(folder: Path, sweeper: str = "optuna_pruning", **settings) -> Path:
    values = {"x": 1, "y": 1, "fail_at": None, "objectives": 1, "steps": 3, "log_mlflow": False}
    return write_app(folder, APP, values, {
        "sampler": {"seed": 123}, "direction": "minimize", "study_name": "s",
        "storage": f"sqlite:///{folder / 'optuna.db'}", "n_trials": 8, "n_jobs": 1,
        "params": {"x": "range(-5.5, 5.5, step=0.5)", "y": "choice(-5, 0, 5)"}, **settings}, sweeper)


sweep = run_sweep


def trials(folder: Path, name: str = "s") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}").trials


def test_the_grammar_and_params_in_config_reach_the_study(tmp_path):
    app = make_app(tmp_path, params={"x": "interval(-1.0, 1.0)", "y": "range(0, 3)"}, n_trials=4)
    result = sweep(app, "+z=tag(log, interval(0.001, 1.0))", "+k=choice(a, b)")
    assert result.returncode == 0, result.stderr[-3000:]
    (first, *_) = done = trials(app)
    dist = first.distributions
    assert dist["x"] == optuna.distributions.FloatDistribution(-1.0, 1.0)
    assert dist["y"] == optuna.distributions.IntDistribution(0, 2)  # range's stop is exclusive, as in Hydra
    assert dist["+z"] == optuna.distributions.FloatDistribution(0.001, 1.0, log=True)
    assert dist["+k"] == optuna.distributions.CategoricalDistribution(["a", "b"])
    assert len(done) == 4 and all(t.state == TrialState.COMPLETE for t in done)


def test_two_objectives_give_a_pareto_front(tmp_path):
    app = make_app(tmp_path, direction=["minimize", "minimize"],
                   params={"x": "range(0, 5, step=0.5)", "y": "range(0, 3, step=0.5)"})
    result = sweep(app, "hydra/sweeper/sampler=nsgaii", "objectives=2")
    assert result.returncode == 0, result.stderr[-3000:]
    front = yaml.safe_load((app / "multirun" / "optimization_results.yaml").read_text())["solutions"]
    assert front and all(len(s["values"]) == 2 for s in front)
    assert all(len(t.values) == 2 for t in trials(app))


def test_a_custom_search_space_adds_dependent_parameters(tmp_path):
    app = make_app(tmp_path, custom_search_space="app.widen", n_trials=4)
    result = sweep(app)
    assert result.returncode == 0, result.stderr[-3000:]
    for t in trials(app):
        assert 0.0 <= t.params["+w"] <= abs(t.params["x"]) and t.value == pytest.approx(
            (t.params["x"] - 1) ** 2 + t.params["y"] ** 2 + t.params["+w"])


def test_a_grid_is_walked_once_whatever_n_trials_says(tmp_path):
    app = make_app(tmp_path, params={"x": "choice(0, 1)", "y": "choice(-5, 5)"}, n_trials=10)
    result = sweep(app, "hydra/sweeper/sampler=grid")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted((t.params["x"], t.params["y"]) for t in trials(app)) == [(0, -5), (0, 5), (1, -5), (1, 5)]


def test_parallel_jobs_and_the_failure_rate(tmp_path):
    app = make_app(tmp_path, params={"x": "choice(0, 1, 2, 3)"}, n_trials=4, n_jobs=2, max_failure_rate=0.0)
    result = sweep(app, "hydra/launcher=joblib", "hydra/sweeper/sampler=grid", "fail_at=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "max_failure_rate=0.0" in result.stderr.strip().splitlines()[-1]
    failed = [t for t in trials(app) if t.state == TrialState.FAIL]
    assert [t.params["x"] for t in failed] == [2] and "asked to fail" in failed[0].user_attrs["fail_reason"]


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "local_workers"])
def test_a_foreign_app_prunes_from_inside_its_jobs_with_every_launcher(tmp_path, launcher):
    """Median pruning: after the first trial, one worse at step 1 than the median so far is stopped there.
    local_workers: the basic launcher in 2 worker processes, each the app's own command line again."""
    local = launcher == "local_workers"
    app = make_app(tmp_path, params={"x": "choice(1, 4, 0, 5, 2, -3)", "y": "choice(0)"}, n_trials=6,
                   n_jobs=1 if launcher == "basic" else 2, local_workers=local)
    result = sweep(app, f"hydra/launcher={'basic' if local else launcher}", "hydra/sweeper/sampler=grid",
                   "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("2 local worker processes" in result.stdout + result.stderr) == local
    done = trials(app)
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert pruned and len(done) == 6, [(t.params, t.state) for t in done]
    assert all(max(t.intermediate_values) < 3 for t in pruned)  # stopped before the last step
    best = min(t.value for t in done if t.state == TrialState.COMPLETE)
    assert best == 0.0  # x=1 is never pruned: it is the best at every step


@pytest.mark.parametrize("pruner", ["hyperband", "successive_halving"])
def test_the_rung_pruners_cut_a_foreign_apps_worst_trials(tmp_path, pruner):
    """hydra/sweeper/pruner=hyperband|successive_halving with their defaults, on 9-step curves: some trials stop at
    a rung, and x=1, the best at every step, always reaches the end."""
    app = make_app(tmp_path, params={"x": "choice(1, 4, 0, 5, 2, -3)", "y": "choice(0)"}, n_trials=6)
    result = sweep(app, "hydra/sweeper/sampler=grid", f"hydra/sweeper/pruner={pruner}", "steps=9")
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(app)
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert len(done) == 6 and pruned, [(t.params, t.state) for t in done]
    assert all(max(t.intermediate_values) < 9 for t in pruned)
    (best,) = [t for t in done if t.params["x"] == 1]
    assert best.state == TrialState.COMPLETE and best.value == 0.0


def test_total_budget_resumes_the_study(tmp_path):
    app = make_app(tmp_path, total_budget=True, n_trials=3)
    assert sweep(app).returncode == 0
    again = sweep(app, "hydra.sweeper.n_trials=5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(trials(app)) == 5  # the total, not 5 more
    third = sweep(app, "hydra.sweeper.n_trials=5")
    assert third.returncode == 0 and "has used its budget (5/5 trials)" in third.stdout + third.stderr


def test_a_plain_mlflow_start_run_logs_into_its_trials_run(tmp_path):
    pytest.importorskip("mlflow")  # the [mlflow] extra
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    app = make_app(tmp_path, n_trials=3, mlflow={"tracking_uri": uri, "experiment": "foreign"})
    result = sweep(app, "log_mlflow=true")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("foreign").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2"]
    assert all(r.info.status == "FINISHED" and "value" in r.data.metrics for r in children)
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    for t in trials(app):
        assert by_number[t.number].data.metrics["value"] == t.value
        assert t.user_attrs["mlflow_run_id"] == by_number[t.number].info.run_id
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] == 3


def test_upstream_defaults_need_no_settings_at_all(tmp_path):
    """Only the sweeper and a space on the command line: upstream's defaults (20 trials in batches of 2, minimize,
    storage null, study_name null) run, and the study lives in the sweep folder, where jobs of any launcher reach
    it."""
    tmp_path.joinpath("app.py").write_text(APP)
    tmp_path.joinpath("config.yaml").write_text(yaml.safe_dump(
        {"x": 1, "y": 0, "fail_at": None, "objectives": 1, "steps": 1, "log_mlflow": False}))
    result = sweep(tmp_path, "hydra/sweeper=optuna_pruning", "x=interval(-5, 5)", "hydra.sweep.dir=multirun")
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'multirun' / 'optuna.db'}")
    assert summary.n_trials == 20 and summary.direction == optuna.study.StudyDirection.MINIMIZE
    best = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert abs(best["best_params"]["x"] - 1) < 1.5  # TPE found the bowl's bottom, x = 1, roughly


def timeout_sweep(tmp_path, timeout, local, steps, sleep, *extra):
    """A sweep that only its timeout ends, of trials of `steps` steps of `sleep` seconds: the trials' length,
    against the timeout, decides which trial the deadline finds running (it stops at its next step)."""
    app = tmp_path if (tmp_path / "app.py").exists() else make_app(
        tmp_path, n_trials=None, timeout=timeout, total_budget=True, n_jobs=2 if local else 1, local_workers=local,
        params={"x": "interval(-5.0, 5.0)", "y": "choice(0)"})
    started = time.time()
    result = sweep(app, f"+sleep={sleep}", f"steps={steps}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(app)
    assert {t.state for t in done} <= {TrialState.COMPLETE, TrialState.PRUNED}  # nothing RUNNING, nothing FAILed
    stopped = [t for t in done if "time budget" in t.user_attrs.get("end_reason", "")]
    assert stopped and all(len(t.intermediate_values) < steps for t in stopped), (result.stderr[-3000:], done)
    assert (app / "multirun" / "optimization_results.yaml").is_file()
    return app, done, time.time() - started


def test_a_timeout_ends_the_sweep_and_resume_continues_the_time_budget(tmp_path):
    """hydra.sweeper.timeout alone: at the deadline no trial starts, the running ones stop at their next step
    (PRUNED, with the reason), the results are still written; the same command then says the time is used, and a
    larger timeout runs only the difference. Trials of 4 s against 7 s: the first completes, the second is the one
    the deadline stops."""

    app, done, took = timeout_sweep(tmp_path, 7, False, 8, 0.5)
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.PRUNED]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{app / 'optuna.db'}")
    assert 7 <= time_spent(study.user_attrs) <= took
    again = sweep(app, "+sleep=0.5", "steps=8")
    assert again.returncode == 0 and "has used its time budget" in again.stdout + again.stderr
    assert len(trials(app)) == len(done)  # no trial started
    _, more, _ = timeout_sweep(app, 14, False, 8, 0.5, "hydra.sweeper.timeout=14")
    assert len(more) == 4
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{app / 'optuna.db'}")
    assert 14 <= time_spent(study.user_attrs) < 14 + 3  # the 7 s it had left, and the stop of its last trial


def test_a_timeout_stops_local_workers_cleanly(tmp_path):
    """The deadline reaches local worker processes: they start no trial after it, stop the running ones at their
    next step, and the sweep ends with exit 0. Their trials (60 s) outlast the timeout (15 s), so the deadline finds
    the first trial of every worker that started running (their start-up counts: they import first, 2-6 s here)."""
    timeout_sweep(tmp_path, 15, True, 600, 0.1)

"""What a user of the upstream hydra-optuna-sweeper relies on, through `hydra/sweeper=optuna_pruning`: the sweep
grammar on a wide table of expressions, the grid walked exactly once, two objectives and their Pareto front,
max_failure_rate, the removed motpe sampler, and jobs that return numpy numbers. A tiny foreign app in a temp
folder, run as its users run it (`python app.py --multirun ...`); only the plugin and its dependencies needed."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

from conftest import run_sweep, write_app

pytestmark = pytest.mark.slow

APP = '''
import hydra
import numpy as np
from omegaconf import OmegaConf

from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial


@hydra.main(config_path=".", config_name="config")
def objective(cfg):
    if cfg.x in cfg.fail_on:
        raise RuntimeError(f"x={cfg.x} was asked to fail")
    # what the job received, for the test to compare with what the study suggested (types included)
    current_trial().set_user_attr("received", OmegaConf.to_container(cfg.p))
    if cfg.objectives == 2:  # small x is good for the first, large x for the second: a front between them
        return [cfg.x ** 2, cfg.x]
    value = (cfg.x - 1) ** 2
    # what numpy code returns: scalars and 0-d arrays, which float() converts
    return {"float32": np.float32, "int64": np.int64, "array": np.array, "float": float}[cfg.returns](value)


if __name__ == "__main__":
    objective()
'''


def make_app(folder: Path, p: dict | None = None, **sweeper) -> Path:
    """The app with `sweeper` as hydra.sweeper settings; `p` the keys of its node p (the grammar's targets)."""
    values = {"x": 1, "fail_on": [], "objectives": 1, "returns": "float", "p": p or {}}
    return write_app(folder, APP, values, {"storage": f"sqlite:///{folder / 'study.db'}", "study_name": "s",
                                           "n_jobs": 1, **sweeper})


sweep = run_sweep


def study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'study.db'}")


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# -- the grammar -------------------------------------------------------------------------------------------------

# expression -> the distribution Optuna gets: the upstream plugin's mapping. Hydra's range excludes its stop;
# interval is a float range unless cast with int(); tag(log, ...) is log-uniform; casts and shuffle give choices.
GRAMMAR = {
    "choice(1,2,3)": CategoricalDistribution([1, 2, 3]),
    "choice(small,large)": CategoricalDistribution(["small", "large"]),
    "choice(0.1,0.2)": CategoricalDistribution([0.1, 0.2]),
    "choice(true,false)": CategoricalDistribution([True, False]),
    "choice(1,a,2.5)": CategoricalDistribution([1, "a", 2.5]),
    "choice('two words',plain)": CategoricalDistribution(["two words", "plain"]),
    "range(1,5)": IntDistribution(1, 4),
    "range(-3,3)": IntDistribution(-3, 2),
    "range(0,10,step=3)": IntDistribution(0, 9, step=3),
    "range(1,6,2)": IntDistribution(1, 5, step=2),
    "range(5,1,-1)": IntDistribution(2, 5),
    "range(0.0,1.0,step=0.25)": FloatDistribution(0.0, 0.75, step=0.25),
    "interval(0.0,1.0)": FloatDistribution(0.0, 1.0),
    "interval(1,10)": FloatDistribution(1.0, 10.0),
    "int(interval(1,12))": IntDistribution(1, 12),
    "tag(log,interval(1e-4,1e-1))": FloatDistribution(1e-4, 0.1, log=True),
    "tag(log,int(interval(1,1024)))": IntDistribution(1, 1024, log=True),
    "float(range(1,4))": CategoricalDistribution([1.0, 2.0, 3.0]),
    "sort(choice(3,1,2))": CategoricalDistribution([1, 2, 3]),
}
KEYS = {expression: f"p.k{i}" for i, expression in enumerate(GRAMMAR)}


@pytest.fixture(scope="module")
def grammar_study(tmp_path_factory) -> tuple[optuna.Study, subprocess.CompletedProcess]:
    """One sweep over every expression of GRAMMAR: half from hydra.sweeper.params in the app's config, half from
    the command line (the two ways upstream reads a space), plus a shuffled range, whose order is random."""
    folder = tmp_path_factory.mktemp("grammar")
    items = list(KEYS.items())
    in_config, on_command_line = items[::2], items[1::2]
    app = make_app(folder, p={f"k{i}": None for i in range(len(items))} | {"shuffled": None}, n_trials=4,
                   params={key: expression for expression, key in in_config})
    result = sweep(app, *[f"{key}={expression}" for expression, key in on_command_line],
                   "p.shuffled=shuffle(range(1,4))", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=7")
    return study(app), result


@pytest.mark.parametrize("expression", GRAMMAR)
def test_each_sweep_expression_becomes_upstreams_distribution(grammar_study, expression):
    found, result = grammar_study
    assert result.returncode == 0, result.stderr[-3000:]
    trials = found.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    key = KEYS[expression]
    assert all(t.distributions[key] == GRAMMAR[expression] for t in trials)
    for t in trials:  # the job got the suggested value, with its type (an override that is read back as typed)
        received = t.user_attrs["received"][key.removeprefix("p.")]
        assert received == t.params[key] and type(received) is type(t.params[key])


def test_a_shuffled_range_is_a_choice_of_its_points(grammar_study):
    found, result = grammar_study
    assert result.returncode == 0, result.stderr[-3000:]
    (distribution,) = {t.distributions["p.shuffled"] for t in found.trials}
    assert isinstance(distribution, CategoricalDistribution) and sorted(distribution.choices) == [1, 2, 3]


@pytest.mark.parametrize("expression, says", [
    ("interval(5,1)", "low <= high"),
    ("tag(log,interval(0,1))", "low > 0"),
    ("range(1,5,0)", "must not be zero"),
])
def test_an_impossible_space_is_one_error_line_before_any_trial(tmp_path, expression, says):
    result = sweep(make_app(tmp_path), f"x={expression}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith("error: ") and says in last_line(result)
    assert not (tmp_path / "study.db").exists() or not study(tmp_path).trials


def test_an_empty_range_is_named_in_its_error(tmp_path):
    result = sweep(make_app(tmp_path), "x=range(1,1)")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "range(1,1)" in last_line(result) and "empty" in last_line(result)


def test_string_choices_reach_the_job_unchanged(tmp_path):
    app = make_app(tmp_path, n_trials=5, p={"s": None})
    result = sweep(app, "p.s=choice('a,b','x=y','it\\'s',str(1),'[1]')", "hydra/sweeper/sampler=grid")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study(app).trials
    assert sorted(t.params["p.s"] for t in trials) == sorted(["a,b", "x=y", "it's", "1", "[1]"])
    for t in trials:
        assert t.state == TrialState.COMPLETE and t.user_attrs["received"]["s"] == t.params["p.s"]


# -- samplers ----------------------------------------------------------------------------------------------------

def test_the_grid_is_walked_exactly_once_and_caps_n_trials(tmp_path):
    """2 x 2 x 2 points (a stepped float range, an int range, a choice): each runs once, though n_trials asks
    for 20, and the sweep ends there."""
    app = make_app(tmp_path, n_trials=20, n_jobs=2, p={"r": None, "c": None})
    result = sweep(app, "x=range(0.0,1.0,step=0.5)", "p.r=range(1,3)", "p.c=choice(a,b)",
                   "hydra/sweeper/sampler=grid")
    assert result.returncode == 0, result.stderr[-3000:]
    points = sorted((t.params["x"], t.params["p.r"], t.params["p.c"]) for t in study(app).trials)
    assert points == [(x, r, c) for x in (0.0, 0.5) for r in (1, 2) for c in ("a", "b")]
    assert all(t.state == TrialState.COMPLETE for t in study(app).trials)


def test_the_removed_motpe_sampler_is_a_clear_error(tmp_path):
    """Optuna 4 removed MOTPESampler (TPESampler does multi-objective). Upstream's config keeps a `motpe` option
    that says so; this plugin offers none, so Hydra names the options there are. Either way no study is made."""
    result = sweep(make_app(tmp_path), "x=interval(0,1)", "hydra/sweeper/sampler=motpe")
    assert "Traceback" not in result.stderr and not (tmp_path / "study.db").exists()
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        assert result.returncode == 1
        assert "Could not find 'hydra/sweeper/sampler/motpe'" in result.stderr
        assert "\ttpe\n" in result.stderr  # the option to use instead is listed
    else:  # upstream's stub is the option: its message, as one error line
        assert result.returncode == 2 and "motpe' sampler was removed" in last_line(result)


@pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes is installed here")
def test_a_sampler_whose_package_is_missing_is_one_error_line(tmp_path):
    """hydra/sweeper/sampler=cmaes needs the cmaes package, which the plugin does not depend on: Optuna imports it
    at the first proposal; the sweep stops with one line naming it, and leaves no trial RUNNING (the one it could
    not propose is withdrawn, with the reason: it never ran)."""
    app = make_app(tmp_path, n_trials=3)
    result = sweep(app, "x=interval(0,1)", "hydra/sweeper/sampler=cmaes")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith("error: ") and "No module named 'cmaes'" in last_line(result)
    *first, last = study(app).trials  # the first is CMA-ES's independent start-up trial: no cmaes needed yet
    assert all(t.state == TrialState.COMPLETE for t in first)
    assert last.state == TrialState.FAIL and "No module named 'cmaes'" in last.user_attrs["withdrawn"]


# -- objectives and results --------------------------------------------------------------------------------------

def pareto_front(trials: list[optuna.trial.FrozenTrial], signs: tuple[int, ...]) -> list[int]:
    """Numbers of the trials no other trial dominates (signs: +1 minimize, -1 maximize)."""
    def dominates(a, b) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    return sorted(t.number for t in trials if not any(dominates(o, t) for o in trials))


def test_two_directions_write_the_pareto_front(tmp_path):
    """direction [minimize, maximize] and a job that returns two values: optimization_results.yaml holds the
    trials no other trial beats on both (upstream's `solutions`), found here from the trials themselves."""
    app = make_app(tmp_path, n_trials=8, direction=["minimize", "maximize"])
    result = sweep(app, "x=interval(-2.0,2.0)", "objectives=2", "hydra.sweeper.sampler.seed=3")
    assert result.returncode == 0, result.stderr[-3000:]
    found = study(app)
    assert found.directions == [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]
    trials = found.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8 and all(len(t.values) == 2 for t in trials)
    solutions = yaml.safe_load((app / "multirun" / "optimization_results.yaml").read_text())["solutions"]
    front = [t for t in trials if t.number in pareto_front(trials, (1, -1))]
    assert sorted((s["params"]["x"], *s["values"]) for s in solutions) == \
        sorted((t.params["x"], *t.values) for t in front)
    assert "Pareto front" in result.stdout + result.stderr


def test_jobs_returning_numpy_numbers_complete_their_trials(tmp_path):
    """np.float32, np.int64 and a 0-d array are what numpy code returns: each is a number to the study, as
    upstream takes anything float() converts."""
    app = make_app(tmp_path, n_trials=3)
    result = sweep(app, "returns=choice(float32,int64,array)", "x=choice(3)", "hydra/sweeper/sampler=grid")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study(app).trials
    assert sorted(t.params["returns"] for t in trials) == ["array", "float32", "int64"]
    assert all(t.state == TrialState.COMPLETE and t.value == 4.0 for t in trials), \
        [(t.params, t.state, t.user_attrs.get("fail_reason")) for t in trials]


# -- failures ----------------------------------------------------------------------------------------------------

def test_max_failure_rate_stops_the_sweep_once_the_studys_failures_exceed_it(tmp_path):
    """Every job fails; max_failure_rate=0.25 of n_trials=8 tolerates 2 failed trials: the third stops the sweep
    (upstream judges each batch alone; this plugin counts the study's failures), with one error line, the
    results file still written, and 5 trials never started."""
    app = make_app(tmp_path, n_trials=8, max_failure_rate=0.25)
    result = sweep(app, "x=choice(0,1,2,3,4,5,6,7)", "fail_on=[0,1,2,3,4,5,6,7]", "hydra/sweeper/sampler=grid")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "max_failure_rate=0.25" in last_line(result)
    trials = study(app).trials
    assert len(trials) == 3 and all(t.state == TrialState.FAIL for t in trials)
    assert all("was asked to fail" in t.user_attrs["fail_reason"] for t in trials)
    assert (app / "multirun" / "optimization_results.yaml").is_file()


def test_failures_within_max_failure_rate_let_the_sweep_finish(tmp_path):
    app = make_app(tmp_path, n_trials=8, max_failure_rate=0.25)
    result = sweep(app, "x=choice(0,1,2,3,4,5,6,7)", "fail_on=[0,5]", "hydra/sweeper/sampler=grid")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {t.params["x"]: t.state for t in study(app).trials}
    assert len(states) == 8
    assert {x for x, s in states.items() if s == TrialState.FAIL} == {0, 5}
    best = yaml.safe_load((app / "multirun" / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"x": 1} and best["best_value"] == 0.0


# -- storage -----------------------------------------------------------------------------------------------------

def test_storage_null_is_a_fresh_study_each_invocation_even_in_a_reused_sweep_folder(tmp_path):
    """Upstream's storage null is an in-memory study: the same command twice runs its trials twice, anew."""
    app = make_app(tmp_path, storage=None, n_trials=2)
    for _ in range(2):
        result = sweep(app, "x=interval(0,2)")
        assert result.returncode == 0, result.stderr[-3000:]
    counts = [summary.n_trials for db in (tmp_path / "multirun").rglob("*.db")
              for summary in optuna.get_all_study_summaries(f"sqlite:///{db}")]
    assert counts and max(counts) == 2, counts  # no study holds both invocations' trials

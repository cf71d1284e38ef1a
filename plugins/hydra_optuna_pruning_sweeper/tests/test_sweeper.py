"""The sweeper's pieces in-process, no CLI: the search space against the command line, the values a job
returns, the best trial's recipe, the grid, every advertised sampler, the settings, names and secrets."""

import importlib.util

import numpy as np
import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.hydra_optuna_pruning_sweeper import _results as results, _study as studies
from hydra_plugins.hydra_optuna_pruning_sweeper._errors import ConfigError
from hydra_plugins.hydra_optuna_pruning_sweeper._redact import has_literal_password, mask_secrets
from hydra_plugins.hydra_optuna_pruning_sweeper._outcome import objective_values
from hydra_plugins.hydra_optuna_pruning_sweeper._space import grid_choices, recipe
from hydra_plugins.hydra_optuna_pruning_sweeper._recovery import retry_once
from hydra_plugins.hydra_optuna_pruning_sweeper._settings import Settings, check_settings
from hydra_plugins.hydra_optuna_pruning_sweeper._clock import SweepClock, time_spent, union_seconds
from hydra_plugins.hydra_optuna_pruning_sweeper._names import STORAGE_ENV
from hydra_plugins.hydra_optuna_pruning_sweeper._study import budget_used, check_study_name, claim_trials, make_storage, open_study, suggest
from hydra_plugins.hydra_optuna_pruning_sweeper._trial import TrialRef, build_pruner, current_trial



def advertised_samplers() -> list[str]:
    """The hydra/sweeper/sampler options a user of this plugin gets: this package's own where the upstream
    hydra-optuna-sweeper is not installed, upstream's (the same names and settings) where it is."""
    from hydra.core.config_store import ConfigStore

    import hydra_plugins.hydra_optuna_pruning_sweeper.config  # noqa: F401 (registers the options)

    if UPSTREAM_INSTALLED:
        import hydra_plugins.hydra_optuna_sweeper.config  # noqa: F401

    return sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().list("hydra/sweeper/sampler"))


def sampler_config(name: str):
    from hydra.core.config_store import ConfigStore

    return OmegaConf.create(ConfigStore.instance().load(f"hydra/sweeper/sampler/{name}.yaml").node)


UPSTREAM_INSTALLED = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
SAMPLERS = [name for name in advertised_samplers() if name != "motpe"]  # motpe: upstream's stub that says it was removed
# Samplers that need a package outside the plugin's dependencies (Optuna imports it at the first proposal): where
# it is missing, that import error is the one failure such a sampler may have
OPTIONAL_PACKAGES = {"cmaes": {"cmaes"}, "gp": {"torch", "scipy"}, "qmc": {"scipy"}}


def sweeper(**settings) -> Settings:
    sampler = OmegaConf.create({"_target_": "optuna.samplers.RandomSampler", "seed": 0})
    return check_settings(sampler=sampler, **settings)


SETTINGS = dict(n_trials=3, timeout=None, n_jobs=1, max_failure_rate=0.5, heartbeat_interval=None, grace_period=None,
                direction="maximize")


def test_the_command_line_wins_over_the_search_space_and_says_so(caplog):
    s = sweeper(params={"model.conv1_channels": "choice(8,16)", "model.fc_width": "choice(64,128)",
                        "model.batch_norm": "true", "optimizer.lr": "interval(0.01,0.1)"})
    distributions, fixed = s.search_space(["model=small", "optimizer.lr=interval(0.1,1.0)", "trainer.seed=3"])
    assert set(distributions) == {"optimizer.lr"} and distributions["optimizer.lr"].low == 0.1
    assert sorted(fixed) == ["model=small", "trainer.seed=3"]
    assert "left out model.batch_norm, model.conv1_channels, model.fc_width" in caplog.text


def test_a_value_fixed_on_the_command_line_replaces_its_space_entry():
    s = sweeper(params={"model.fc_width": "choice(64,128)", "model.dropout": "interval(0.1,0.5)"})
    distributions, fixed = s.search_space(["model.fc_width=32"])
    assert set(distributions) == {"model.dropout"} and fixed == ["model.fc_width=32"]


@pytest.mark.parametrize("returned, n, expected", [
    (0.5, 1, [0.5]), (1, 1, [1.0]), ([0.5, 3], 2, [0.5, 3.0]), (True, 1, [1.0]), ("0.25", 1, [0.25]),
    # what numpy and torch return: upstream takes anything float() converts, and so does this plugin
    (np.float32(0.5), 1, [0.5]), (np.int64(3), 1, [3.0]), (np.array(0.75), 1, [0.75]),
    ((np.float64(1.0), np.array(2)), 2, [1.0, 2.0]),
    (None, 1, "trial 7: the job returned 'None' of type NoneType, which float() cannot convert; return a number"),
    ("abc", 1, "of type str, which float() cannot convert"), (np.zeros(3), 1, "of type ndarray"),
    ([0.5], 2, "expected a list of 2 numbers"), (float("nan"), 1, "not finite"),
])
def test_what_a_job_returns_becomes_values_or_a_reason(returned, n, expected):
    got = objective_values(returned, n, trial_number=7)
    assert got == expected if isinstance(expected, list) else expected in got


@pytest.mark.parametrize("setting, value, message", [
    ("n_trials", 0, "hydra.sweeper.n_trials=0 must be an integer >= 1"),
    ("n_trials", "abc", "hydra.sweeper.n_trials='abc' must be an integer >= 1"),
    ("n_jobs", 1.5, "hydra.sweeper.n_jobs=1.5 must be an integer >= 1"),
    ("max_failure_rate", 2, "hydra.sweeper.max_failure_rate=2 must be a number in [0, 1]"),
    ("grace_period", True, "hydra.sweeper.grace_period=True must be an integer"),
    ("timeout", 0, "hydra.sweeper.timeout=0 must be a number of seconds > 0, or null"),
    ("timeout", "10m", "hydra.sweeper.timeout='10m' must be a number of seconds > 0"),
    ("n_trials", None, "hydra.sweeper.n_trials=null needs hydra.sweeper.timeout"),
])
def test_bad_sweeper_settings_name_the_key_and_what_is_allowed(setting, value, message):
    with pytest.raises(ConfigError, match=None) as e:
        check_settings(**SETTINGS | {setting: value})
    assert message in str(e.value)


def test_the_best_recipe_is_unescaped_and_leaves_out_where_the_study_lives():
    overrides = ["optimizer=adamw", "model.dropout=0.25", r"data.root=/data/mnist\ v2", "storage=postgres",
                 "storage.url='postgresql://u@h/d'", "trainer.threads=1", "mlflow.tracking_uri=sqlite\\:///x.db",
                 "~hparams_search", "data.download=false"]
    choices, values = recipe(overrides, {"optimizer", "storage", "model"},
                             ("storage", "mlflow", "hparams_search", "trainer.threads"))
    assert choices == {"optimizer": "adamw"}
    assert values == {"model.dropout": 0.25, "data.root": "/data/mnist v2", "data.download": False}
    text = results.experiment_yaml(choices, values, "best trial 3")
    assert yaml.safe_load(text) == {"defaults": [{"override /optimizer": "adamw"}],
                                    "model": {"dropout": 0.25}, "data": {"root": "/data/mnist v2", "download": False}}
    assert text.startswith("# @package _global_\n")


def test_a_grid_is_made_of_the_space_points_and_refuses_continuous_ranges():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert grid_choices("a", CategoricalDistribution(["x", "y"])) == ["x", "y"]
    assert grid_choices("b", IntDistribution(2, 8, step=3)) == [2, 5, 8]
    assert grid_choices("c", FloatDistribution(0.0, 0.5, step=0.25)) == [0.0, 0.25, 0.5]
    with pytest.raises(ConfigError, match="c is FloatDistribution"):
        grid_choices("c", FloatDistribution(0.0, 0.5))


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_advertised_sampler_builds_and_proposes_trials(name):
    """Each hydra/sweeper/sampler option, built as the sweeper builds it, runs a few trials of a mixed space. The
    plugin does not depend on cmaes, scipy or torch: where the one a sampler needs is missing, the only failure
    allowed is the import of that package (the sweep turns it into one error line: test_plugin.py)."""
    s = check_settings(sampler=sampler_config(name), n_trials=4)
    distributions, _ = s.search_space(["x=choice(1,2)", "y=range(0,3)"] if name == "grid" else
                                       ["x=interval(-1.0,1.0)", "y=range(0,3)", "z=choice(a,b)"])
    sampler, grid_size = s.seeded_sampler(0, distributions)
    n_trials = min(4, grid_size or 4)
    study = optuna.create_study(sampler=sampler, directions=["minimize", "minimize"] if name == "nsgaii" else None)
    try:
        for _ in range(n_trials):
            trial = study.ask()
            suggest(trial, distributions)
            study.tell(trial, [trial.params["y"]] * len(study.directions))
    except ModuleNotFoundError as e:
        assert e.name in OPTIONAL_PACKAGES.get(name, ()) and importlib.util.find_spec(e.name) is None, e
        return
    assert len(study.trials) == n_trials and all(t.state == TrialState.COMPLETE for t in study.trials)


@pytest.mark.skipif(not UPSTREAM_INSTALLED, reason="motpe is an option of upstream's config only; without it "
                    "test_upstream.py::test_the_removed_motpe_sampler_is_a_clear_error covers Hydra's answer")
def test_the_removed_motpe_sampler_is_one_clear_error():
    s = check_settings(sampler=sampler_config("motpe"))
    with pytest.raises(ConfigError, match="motpe' sampler was removed in Optuna 4.0. Use 'hydra/sweeper/sampler=tpe'"):
        s.seeded_sampler(0, {})


class BrokenSampler(optuna.samplers.RandomSampler):
    def sample_independent(self, study, trial, name, distribution):
        raise ImportError("No module named 'somepackage'")


def test_a_failing_sampler_leaves_no_trial_running(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = open_study(storage, "s", ["maximize"], BrokenSampler())
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    with pytest.raises(ConfigError, match="sampler could not propose a trial: ImportError"):
        claim_trials(study, storage, 3, 1, lambda trials: False, lambda t: suggest(t, space))
    (trial,) = study.trials  # withdrawn: it never ran, and leaves the budget
    assert trial.state == TrialState.FAIL and "somepackage" in trial.user_attrs["withdrawn"]
    assert budget_used(study) == 0


def test_a_claim_reads_the_study_once_under_the_lock(tmp_path, monkeypatch):
    """Each read of a study loads every unfinished trial again (Optuna keeps only finished ones), so with many
    workers every extra read under the claim lock lengthens every other worker's wait."""
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = open_study(storage, "s", ["maximize"], optuna.samplers.RandomSampler(seed=0))
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for _ in range(3):  # trials of other workers, still running
        claim_trials(study, storage, 10, 1, lambda trials: False, lambda t: suggest(t, space))
    reads, read = [], study.get_trials
    monkeypatch.setattr(study, "get_trials", lambda *a, **k: reads.append(k) or read(*a, **k))
    seen = []
    (trial,) = claim_trials(study, storage, 10, 1, lambda trials: seen.append(len(trials)) or False,
                            lambda t: suggest(t, space))
    assert len(reads) == 1 and seen == [3] and trial.number == 3


def test_the_tally_counts_the_budget_from_one_read(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="minimize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for value in (3.0, 1.0, 1.0):
        study.tell(study.ask(x), value)
    study.ask(x)  # running
    failed = study.ask(x)
    study.tell(failed, state=TrialState.FAIL)
    retry_once(study, failed.number)  # queued: its retry stands in for it, and counts once it runs
    tally = studies.tally(study.get_trials(deepcopy=False))
    assert (tally.size, tally.used, tally.failed, tally.running) == (6, 4, 0, 1)
    (best,) = results.best_trials(study, study.get_trials(deepcopy=False))
    assert best.number == 1 and best.value == study.best_value  # the first of equals


def test_an_interrupted_trial_is_queued_again_once(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, state=TrialState.FAIL)
    retry_once(study, trial.number)
    retry_once(study, trial.number)  # a second interruption of the same trial queues nothing more
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == trial.params
    assert budget_used(study) == 0  # the retry stands in for the interrupted trial


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", "", "-x", "a" * 101, "x y"])
def test_a_study_name_is_a_name_not_a_path(name):
    with pytest.raises(ConfigError, match="is not allowed"):
        check_study_name(name)


def test_ordinary_study_names_pass():
    for name in ("default-3f2a9c1b", "pruned12", "my_study.v2"):
        assert check_study_name(name) == name


def test_url_passwords_are_masked_wherever_they_appear():
    text = "error: storage 'postgresql+psycopg://bob:hunter2@db:5432/m' and http://al:pw@mlflow:5000/x"
    assert mask_secrets(text) == "error: storage 'postgresql+psycopg://bob:***@db:5432/m' and http://al:***@mlflow:5000/x"
    assert mask_secrets("sqlite:///outputs/optuna.db http://host:5000") == "sqlite:///outputs/optuna.db http://host:5000"


def test_a_written_out_password_is_told_apart_from_one_resolved_at_run_time():
    assert has_literal_password("postgresql://bob:hunter2@db/m")
    assert not has_literal_password("postgresql://bob:${oc.env:DB_PASSWORD}@db/m")
    assert not has_literal_password("postgresql://bob@db/m") and not has_literal_password("sqlite:///x.db")


def test_the_trial_identity_travels_in_the_environment_without_the_storage_secret():
    ref = TrialRef("postgresql://u:pw@h/d", "s", 3, '{"_target_": "optuna.pruners.MedianPruner"}')
    env = ref.job_env()
    assert "pw" not in " ".join(env.values()) and STORAGE_ENV not in env
    assert TrialRef.from_env({**env, **ref.sweep_env()}) == ref
    assert TrialRef.from_env({}) is None


def test_outside_a_sweep_current_trial_reports_nowhere():
    trial = current_trial({})
    trial.report(0.5, step=1)  # no study, no error: the same training code runs alone
    assert trial.number is None


def test_a_pruner_spec_builds_only_optuna_pruners():
    assert isinstance(build_pruner("{}"), optuna.pruners.NopPruner)
    assert isinstance(build_pruner('{"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2}'),
                      optuna.pruners.MedianPruner)
    with pytest.raises(ConfigError, match="is not allowed: use optuna.pruners"):
        build_pruner('{"_target_": "os.system"}')


def test_a_timeout_alone_may_end_a_sweep_without_n_trials():
    settings = check_settings(**SETTINGS | {"n_trials": None, "timeout": 90})
    assert settings.n_trials is None and settings.timeout == 90.0


def test_the_time_a_study_has_spent_counts_overlapping_workers_once():
    assert union_seconds([]) == 0
    assert union_seconds([(0, 10), (5, 12), (20, 21)]) == 13  # two workers at once, then a resume
    assert union_seconds([(0, 10), (2, 3)]) == 10
    attrs = {"sweep_time:a": [100.0, 160.0], "sweep_time:b": [130.0, 170.0], "mlflow_parent_run_id": "x"}
    assert time_spent(attrs) == 70
    clock = SweepClock.start(timeout=100, spent_before=70, now=1000.0)
    assert clock.deadline == 1030.0 and not clock.past(1029.9) and clock.past(1030.0)
    assert SweepClock.start(timeout=None, spent_before=70).deadline is None
    assert not SweepClock.start(timeout=None, spent_before=0).past()


def test_a_report_past_the_deadline_stops_the_trial_but_never_its_last_step(tmp_path):
    import time

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    ref = TrialRef(url, "s", trial.number, "{}", deadline=time.time() - 1)
    assert TrialRef.from_env({**ref.job_env(), **ref.sweep_env()}) == ref  # the deadline travels too
    report = current_trial({**ref.job_env(), **ref.sweep_env()})
    with pytest.raises(optuna.TrialPruned, match=r"stopped at step 2 .*time budget \(hydra.sweeper.timeout\)"):
        report.report(0.5, step=2)
    report.report(0.7, step=3, last=True)  # the work is done: recorded, not thrown away
    assert study.trials[0].intermediate_values == {2: 0.5, 3: 0.7}
    in_time = TrialRef(url, "s", trial.number, "{}", deadline=time.time() + 60)
    current_trial({**in_time.job_env(), **in_time.sweep_env()}).report(0.8, step=4)  # no stop before it

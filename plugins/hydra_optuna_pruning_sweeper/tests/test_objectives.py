"""A study's objectives are fixed once it exists: resumed with another direction or metric, Optuna would rank
the old and new values together without a word (loss values in an accuracy study, the wrong trial called best)."""

import optuna
import pytest
from test_fresh_study import make_app, sweep

from hydra_plugins.hydra_optuna_pruning_sweeper._errors import ConfigError
from hydra_plugins.hydra_optuna_pruning_sweeper._study import check_objectives, make_storage, open_study


def accuracy_study(tmp_path) -> optuna.Study:
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = open_study(storage, "s", ["maximize"], optuna.samplers.RandomSampler())
    study.set_metric_names(["val/acc"])
    return study


def test_the_same_objectives_resume(tmp_path):
    study = accuracy_study(tmp_path)
    check_objectives(study, ["maximize"], ["val/acc"])
    check_objectives(study, ["maximize"], None)  # an app that names no metric keeps the study's


@pytest.mark.parametrize("directions, names, asked", [
    (["minimize"], ["val/loss"], "val/loss (minimize)"),
    (["maximize"], ["val/f1"], "val/f1 (maximize)"),
    (["minimize"], None, "asks for minimize"),
    (["maximize", "minimize"], ["val/acc", "params"], "val/acc (maximize), params (minimize)"),
])
def test_other_objectives_are_refused_naming_both(tmp_path, directions, names, asked):
    with pytest.raises(ConfigError) as e:
        check_objectives(accuracy_study(tmp_path), directions, names)
    assert str(e.value).startswith("study 's' optimizes val/acc (maximize); this sweep")
    assert asked in str(e.value) and "hydra.sweeper.study_name" in str(e.value)


@pytest.mark.slow
def test_a_resumed_sweep_with_another_direction_stops_before_any_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    app = make_app(tmp_path / "app", study_name="s", storage=storage, total_budget=True, direction="maximize",
                   metric_names=["score"])
    first = sweep(app, "x=interval(0,1)")
    assert first.returncode == 0, first.stderr[-2000:]
    again = sweep(app, "x=interval(0,1)", "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=4",
                  "hydra.sweeper.metric_names=[loss]")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "error: study 's' optimizes score (maximize); this sweep asks for loss (minimize)" in again.stderr
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 2 and study.metric_names == ["score"]  # nothing run, nothing renamed

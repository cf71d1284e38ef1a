"""Upstream's behaviour where upstream is right: with `storage: null` every invocation sweeps a new study, even in a
sweep folder used again (its SQLite file is there), and an empty range is named in its error."""

from pathlib import Path

import optuna
import pytest

from hydra_plugins.hydra_optuna_pruning_sweeper._errors import ConfigError
from hydra_plugins.hydra_optuna_pruning_sweeper._space import sweep_space
from hydra_plugins.hydra_optuna_pruning_sweeper._study import make_storage, open_study

from conftest import run_sweep, write_app

APP = '''
import hydra
from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial


@hydra.main(version_base=None, config_path=".", config_name="config")
def objective(cfg):
    current_trial().report(cfg.x, 1, last=True)
    return cfg.x


if __name__ == "__main__":
    objective()
'''


def make_app(folder: Path, **sweeper) -> Path:
    return write_app(folder, APP, {"x": 1}, {"sampler": {"seed": 1}, "n_trials": 2, "n_jobs": 1, **sweeper})


sweep = run_sweep


def studies_in(folder: Path) -> dict[str, int]:
    storage = f"sqlite:///{folder / 'multirun' / 'optuna.db'}"
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}


def test_a_fresh_study_takes_the_next_free_name_and_leaves_the_old_one(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    first = open_study(storage, "s", ["minimize"], optuna.samplers.RandomSampler(), fresh=True)
    first.enqueue_trial({})
    second = open_study(storage, "s", ["minimize"], optuna.samplers.RandomSampler(), fresh=True)
    resumed = open_study(storage, "s", ["minimize"], optuna.samplers.RandomSampler())
    assert (first.study_name, second.study_name, resumed.study_name) == ("s", "s-2", "s")
    assert len(resumed.trials) == 1 and second.trials == []


@pytest.mark.parametrize("argument", ["x=range(1,1)", "x=range(5,1)"])
def test_an_empty_range_is_named_in_its_error(argument):
    with pytest.raises(ConfigError) as e:
        sweep_space(None, [argument])
    assert str(e.value).startswith(f"{argument} is an empty range")


@pytest.mark.slow
def test_storage_null_sweeps_a_new_study_each_invocation_in_a_reused_sweep_folder(tmp_path):
    app = make_app(tmp_path / "app", study_name="s")
    for _ in range(2):
        done = sweep(app, "x=interval(0,1)")
        assert done.returncode == 0, done.stderr[-2000:]
    assert studies_in(app) == {"s": 2, "s-2": 2}  # 2 trials each: the second did not continue the first
    log = done.stdout + done.stderr
    assert "study 's' is already in" in log and "this one is 's-2'" in log


@pytest.mark.slow
def test_storage_null_with_total_budget_still_resumes(tmp_path):
    app = make_app(tmp_path / "app", study_name="s", total_budget=True)
    sweep(app, "x=interval(0,1)")
    done = sweep(app, "x=interval(0,1)", "hydra.sweeper.n_trials=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert studies_in(app) == {"s": 3}


@pytest.mark.slow
def test_an_empty_range_on_the_command_line_is_one_error_line(tmp_path):
    done = sweep(make_app(tmp_path / "app"), "x=range(1,1)")
    assert done.returncode == 2
    assert "error: x=range(1,1) is an empty range" in done.stderr and "Cannot convert" not in done.stderr

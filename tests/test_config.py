"""Every option of every config group composes with Hydra's compose API and builds a valid run."""

import inspect
import re
from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mnist_sweep.config import build_spec
from mnist_sweep.errors import ConfigError
from mnist_sweep.model import build_model

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["model", "optimizer", "scheduler", "data", "trainer", "experiment", "storage"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_config(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option):
    cfg = compose_config(f"{group}={option}", "data.root=/nonexistent")
    spec = build_spec(cfg)
    model = build_model(spec.model)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    optimizer = spec.make_optimizer(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    if spec.make_scheduler is not None:
        spec.make_scheduler(optimizer, 100)


SPACES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml") if p.stem != "none")


def test_no_search_space_leaves_the_sweeper_settings_to_any_sweeper():
    """hparams_search=none sets nothing under hydra.sweeper, so the basic sweeper (a plain grid) composes."""
    assert compose_config("hparams_search=none", hydra=True).hydra.sweeper.params is None
    basic = compose_config("hparams_search=none", "hydra/sweeper=basic", hydra=True).hydra.sweeper
    assert basic._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@pytest.mark.parametrize("space", SPACES)
def test_every_search_space_composes_and_parses(space):
    """Each conf/hparams_search option yields a sweeper config whose params the plugin's grammar parses into
    Optuna distributions over keys that exist in the run config."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = compose_config(f"hparams_search={space}", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_pruning_sweeper.optuna_pruning_sweeper.OptunaPruningSweeper" and sweeper.space_name == space
    distributions, fixed, _ = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert len(distributions) >= 6
    for key in [*distributions, *fixed]:
        assert OmegaConf.select(cfg, key) is not None, key  # a group (optimizer) or a value (model.dropout)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("sampler", ["random", "grid", "cmaes"])
def test_another_sampler_replaces_the_spaces_tpe_settings(space, sampler):
    """A space's TPE settings live in its own sampler option (conf/hydra/sweeper/sampler/tpe_<space>.yaml), so
    hydra/sweeper/sampler=<other> drops them rather than failing on a key the other sampler lacks."""
    import hydra.utils

    cfg = compose_config(f"hparams_search={space}", f"hydra/sweeper/sampler={sampler}", hydra=True)
    settings = OmegaConf.to_container(cfg.hydra.sweeper.sampler)
    accepted = inspect.signature(hydra.utils.get_class(settings["_target_"])).parameters
    assert set(settings) - {"_target_", "_partial_"} <= set(accepted)  # GridSampler is a partial: checked here
    assert hydra.utils.instantiate(settings) is not None
    tpe = compose_config(f"hparams_search={space}", hydra=True).hydra.sweeper.sampler
    assert tpe._target_ == "optuna.samplers.TPESampler" and tpe.seed == 0 and tpe.n_startup_trials >= 8


def test_every_yaml_value_is_commented():
    """House rule: each value says what it means. Lines that set a value carry a '#' comment; the lines of a block
    text (`key: |  # comment`, the help page) are that value, commented on its key's line."""
    bare = []
    for path in CONF.rglob("*.yaml"):
        block = None  # indentation of the key whose block text follows
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            indent = len(line) - len(line.lstrip())
            if block is not None and (not s or indent > block):
                continue
            block = indent if re.search(r":\s*[|>][-+]?\s*(#.*)?$", s) else None
            if not s or s.startswith(("#", "-")) or s.endswith(":") or "#" in s:
                continue
            bare.append(f"{path.relative_to(CONF)}:{n}: {s}")
    assert not bare, "values without a comment:\n" + "\n".join(bare)


def test_default_config_is_the_classic_recipe():
    spec = build_spec(compose_config("data.root=/x"))
    model = build_model(spec.model)
    opt = spec.make_optimizer(model.parameters())
    sched = spec.make_scheduler(opt, 10)
    assert type(opt).__name__ == "Adadelta" and opt.defaults["lr"] == 1.0
    assert type(sched).__name__ == "StepLR" and sched.gamma == 0.7
    assert spec.data.val_size > 0 and spec.optimized_metric == ("val/acc",)


def test_onecycle_gets_steps_per_epoch_from_the_data():
    spec = build_spec(compose_config("scheduler=onecycle", "trainer.epochs=3", "data.root=/x"))
    opt = spec.make_optimizer(build_model(spec.model).parameters())
    sched = spec.make_scheduler(opt, 7)
    assert sched.total_steps == 21 and spec.scheduler_interval == "step"


def test_data_root_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("MNIST_ROOT", "/somewhere/else")
    assert build_spec(compose_config()).data.root == "/somewhere/else"
    monkeypatch.delenv("MNIST_ROOT")
    assert build_spec(compose_config()).data.root == "data"


@pytest.mark.parametrize("override, message", [
    ("optimized_metric=test/acc", "never used for selection"),
    ("optimized_metric=val/accuracy", "not a metric this project records"),
    ("optimizer._target_=os.system", "could not be built"),
    ("trainer.precision=fp8", "trainer.precision='fp8'"),
])
def test_bad_values_fail_while_building(override, message):
    with pytest.raises(ConfigError, match=message):
        build_spec(compose_config(override, "data.root=/x"))


STORAGES = sorted(p.stem for p in (CONF / "storage").glob("*.yaml"))


@pytest.mark.parametrize("option", STORAGES)
def test_every_storage_option_is_the_sweepers_storage(option):
    """storage=<option> sets the URL the sweeper opens; SQLite, a file under outputs/, stays the default."""
    cfg = compose_config(f"storage={option}", hydra=True)
    assert cfg.hydra.sweeper.storage == cfg.storage.url
    assert cfg.storage.url.startswith({"sqlite": "sqlite:///", "postgres": "postgresql://"}[option])
    assert compose_config(hydra=True).hydra.sweeper.storage == "sqlite:///outputs/optuna.db"


def test_many_workers_are_a_config_change():
    cfg = compose_config("storage=postgres", "storage.url=postgresql://me@dbhost/mnist",
                         "mlflow.tracking_uri=http://mlflow-host:5000", hydra=True)
    assert cfg.hydra.sweeper.storage == "postgresql://me@dbhost/mnist"
    assert cfg.mlflow.tracking_uri == "http://mlflow-host:5000"


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)")
    cfg = compose_config("hydra/launcher=slurm", "storage=postgres", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_optuna_pruning_sweeper._slurm.SlurmLauncher"
    assert launcher.cpus_per_task == 4 and launcher.timeout_min == 60 and launcher.partition is None
    assert launcher.submitit_folder.endswith("/.submitit/%j")


PRUNERS = sorted(p.stem for p in (CONF / "hydra" / "sweeper" / "pruner").glob("*.yaml"))


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_option_builds_as_a_trial_builds_it(name):
    """hydra/sweeper/pruner=<name> travels to each trial's job as JSON and is built there (hyperband's
    max_resource='auto' is a string where Optuna takes one)."""
    import json

    from hydra_plugins.hydra_optuna_pruning_sweeper import build_pruner

    cfg = compose_config(f"hydra/sweeper/pruner={name}", hydra=True)
    spec = json.dumps(OmegaConf.to_container(cfg.hydra.sweeper.pruner, resolve=True))
    assert isinstance(build_pruner(spec), optuna.pruners.BasePruner)

"""Bad config values and missing data, in-process: the command line's overrides composed with Hydra's compose API
and run through the same build_spec -> train_and_record path as `python -m mnist_sweep`, without a subprocess.
Each must stop with one UserError naming the key, the value and what is allowed, before MLflow is touched. The CLI
printing it as one `error:` line with exit 2 is tests/test_cli.py::test_a_bad_input_is_one_error_line_and_no_run.
"""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from conftest import FAST, REPO, mlflow_runs
from mnist_sweep.__main__ import run_config
from mnist_sweep.errors import ConfigError, DivergedError, UserError

BAD_INPUTS = [
    ("model.conv1_channels=0", "model.conv1_channels=0 must be >= 1"),
    ("model.blocks=[[32,0]]", "model.blocks=[[32, 0]] is not a valid list of conv blocks; allowed: a list of at "
                              "most 4 blocks"),
    ("model.blocks=[32,64]", "model.blocks=[32, 64] is not a valid list of conv blocks"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("model.dropout=abc", "model.dropout='abc' must be a finite number"),
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("trainer.epochs=1.5", "trainer.epochs=1.5 must be an integer"),
    ("trainer.epochs=abc", "trainer.epochs='abc' must be an integer"),
    ("trainer.epochs=null", "trainer.epochs=null must be an integer"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("data.batch_size=1.5", "data.batch_size=1.5 must be an integer"),
    ("data.mean=nan", "data.mean=nan must be a finite number"),
    ("data.download=yes", "data.download='yes' must be true or false"),
    ("data.root=2024", "data.root=2024 must be a string; quote it on the command line, e.g. data.root='2024'"),
    ("data.root=", "data.root='' is empty: point it at the folder that holds MNIST/raw/"),
    ("+foo=1", "foo=1 is not a setting of mnist_sweep"),
    ("+seed=3", "seed=3 is not a setting of mnist_sweep"),
    ("data.val_size=1200", "data.val_size=1200 leaves no training data"),
    ("data.loader=turbo", "data.loader='turbo' is not a loader"),
    ("trainer.device=tpu", "trainer.device='tpu' is not a device"),
    ("trainer.device=cuda:abc", "trainer.device='cuda:abc' is not a device; allowed: auto, cpu, cuda, cuda:N"),
    ("trainer.precision=fp16", "trainer.precision='fp16' is not a precision"),
    ("trainer.compile_mode=turbo", "trainer.compile_mode='turbo' is not a torch.compile mode"),
    ("optimized_metric=val/f1", "optimized_metric='val/f1' is not a metric"),
    ("optimizer.lr=-1", "optimizer.lr=-1 must be > 0"),
    ("optimizer.lr=0", "optimizer.lr=0 must be > 0"),
    ("optimizer.lr=abc", "optimizer.lr='abc' must be a number"),
    ("scheduler.gamma=fast", "scheduler.gamma='fast' must be a number"),
    ("mlflow.experiment=''", "mlflow.experiment='' must be a non-empty string"),
    ("MISSING_DATA", "MNIST not found"),
    ("model.channels=3", "Could not override 'model.channels'"),
    ("model=huge", "Could not find 'model/huge'"),
    ("hydra/sweeper/pruner=patient", "Could not find 'hydra/sweeper/pruner/patient'"),
    ("hydra/sweeper/sampler=bayes", "Could not find 'hydra/sweeper/sampler/bayes'"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("trainer.device=cuda", "CUDA is not available"))


def compose_cli(tmp_path, mnist_root, *overrides: str):
    """The config `python -m mnist_sweep FAST OVERRIDES` runs, with MLflow in tmp_path."""
    fast = [a for a in FAST if not a.startswith("trainer.threads=")]  # would set torch's threads for the whole session
    args = [*fast, f"data.root={mnist_root}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        return compose("config", overrides=args)


@pytest.mark.parametrize("override, message", BAD_INPUTS, ids=[o for o, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_mlflow_starts(tmp_path, mnist_root, override, message):
    extra = f"data.root={tmp_path / 'empty'}" if override == "MISSING_DATA" else override
    try:
        cfg = compose_cli(tmp_path, mnist_root, extra)
    except HydraException as e:  # an override Hydra refuses: the CLI prints Hydra's message, which lists the options
        assert message in str(e)
        return
    with pytest.raises(UserError) as err:
        run_config(cfg, {})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the MLflow store was even opened


def test_training_on_the_validation_images_is_refused_in_a_sweep_that_optimizes_them(tmp_path, mnist_root):
    cfg = compose_cli(tmp_path, mnist_root, "data.train_on_val=true")
    with pytest.raises(ConfigError, match=r"data\.train_on_val=true in a sweep that optimizes val/acc: .*refit"):
        run_config(cfg, {}, sweeping=True)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_diverging_run_is_recorded_failed_with_its_reason(tmp_path, mnist_root):
    """A NaN loss shows only once training runs, inside the MLflow run: that run ends FAILED with the reason."""
    cfg = compose_cli(tmp_path, mnist_root, "optimizer.lr=1e12", "trainer.epochs=1")
    with pytest.raises(DivergedError, match="training diverged: the loss became NaN/inf"):
        run_config(cfg, {})
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "diverged" in runs[0].data.tags["end_reason"]

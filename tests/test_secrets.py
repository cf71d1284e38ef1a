"""A database password never reaches a file, a record or the terminal: a written-out one is refused before Hydra
saves anything, and one resolved at run time (${oc.env:VAR}) is masked wherever a URL is shown or stored."""

import os
from pathlib import Path

import pytest

from conftest import cli_args, run_cli

pytestmark = pytest.mark.slow
SECRET = "Hunter2-s3cret-xyz"
PG = os.environ.get("MNIST_SWEEP_TEST_PG")


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under `folder` (databases, logs, Hydra's .hydra/, MLflow artifacts) whose bytes hold `secret`."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_a_written_out_password_is_refused_before_anything_is_saved(tmp_path, mnist_root, mode):
    url = f"postgresql://bob:{SECRET}@127.0.0.1:9/mnist"
    args = (["--multirun"] if mode == "multirun" else []) + cli_args(tmp_path, mnist_root, f"storage.url={url}")
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "storage.url=postgresql://bob:***@127.0.0.1:9/mnist holds a password in clear text" in line
    assert "PGPASSWORD" in line and "${oc.env:" in line
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("url, advice, not_said", [
    ("http://bob:pw@127.0.0.1:5000", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"),
    ("postgresql://bob:pw@db/mnist", "PGPASSWORD or ~/.pgpass", "MLFLOW_TRACKING"),
])
def test_the_advice_for_a_written_out_password_fits_the_url(url, advice, not_said):
    """A tracking server's password is MLflow's business (its own variables), a database's is PostgreSQL's."""
    from mnist_sweep.__main__ import password_advice

    text = password_advice(url)
    assert advice in text and not_said not in text and "${oc.env:" in text


def test_a_password_resolved_at_run_time_is_never_written_or_printed(tmp_path, mnist_root):
    """Any URL in the config is masked the same way: storage.url, which the sweep does not open here (its storage
    is set apart), stands in for one it opens (test_a_postgres_password_from_the_environment_stays_out_of_every_record
    opens one)."""
    result = run_cli(["--multirun", *cli_args(tmp_path, mnist_root, "trainer.epochs=1"), "~hparams_search",
                      "model.dropout=interval(0.1,0.6)", "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=s",
                      f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                      f"hydra.sweeper.best_config_dir={tmp_path / 'configs'}",
                      "storage.url='postgresql://bob:${oc.env:MNIST_TEST_SECRET}@replica/mnist'"],
                     cwd=tmp_path, env={"MNIST_TEST_SECRET": SECRET})
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    assert files_holding(tmp_path, SECRET) == []
    # the value was there, resolved and masked: the trials' MLflow params show the masked URL
    from conftest import mlflow_runs

    _, runs = mlflow_runs(tmp_path)
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2 and trials[0].data.params["storage.url"] == "postgresql://bob:***@replica/mnist"


@pytest.mark.skipif(not PG, reason="no PostgreSQL: set MNIST_SWEEP_TEST_PG (.ci/run starts one)")
def test_a_postgres_password_from_the_environment_stays_out_of_every_record(tmp_path, mnist_root):
    """The README's scale-out setup: storage=postgres, the password in an environment variable. The test server
    trusts loopback, so it ignores the password, which still travels through every place a URL goes."""
    import uuid

    import psycopg

    name = f"secret_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    user_host = PG.removeprefix("postgresql://")  # user@host:port
    user, host = user_host.split("@")
    url = f"postgresql://{user}:${{oc.env:MNIST_TEST_SECRET}}@{host}/{name}"
    result = run_cli(["--multirun", *cli_args(tmp_path, mnist_root, "trainer.epochs=1"), "~hparams_search",
                      "model.dropout=interval(0.1,0.6)", "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=s",
                      f"hydra.sweeper.best_config_dir={tmp_path / 'configs'}", "storage=postgres",
                      f"storage.url='{url}'", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"],
                     cwd=tmp_path, env={"MNIST_TEST_SECRET": SECRET})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 1 (2/2)" in result.stdout + result.stderr or "(2/2)" in result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert files_holding(tmp_path, SECRET) == []
    with psycopg.connect(f"{PG}/{name}") as conn:  # the study's own tables: trial attributes, params
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        for table in tables:
            assert SECRET not in str(conn.execute(f'SELECT * FROM "{table}"').fetchall()), table

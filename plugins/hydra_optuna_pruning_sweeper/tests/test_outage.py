"""A running sweep rides out its database going away (hydra.sweeper.storage_wait, _outage.py): the retry rule on
a fake clock, a claim cut off mid-way, and workers of a foreign app on a PostgreSQL of their own that is restarted
twice and stopped for a while, then stopped for longer than the wait. Nothing may be lost or counted twice.

The PostgreSQL tests start a throwaway server with the repository's .ci/postgres.sh (they skip without it, e.g.
where the plugin is installed alone)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import write_app
from hydra_plugins.hydra_optuna_pruning_sweeper._names import WITHDRAWN_ATTR, WORKER_ATTR
from hydra_plugins.hydra_optuna_pruning_sweeper import _study as studies
from hydra_plugins.hydra_optuna_pruning_sweeper._errors import ConfigError
from hydra_plugins.hydra_optuna_pruning_sweeper._outage import Outage, is_transient
from hydra_plugins.hydra_optuna_pruning_sweeper._study import budget_used, claim_trials, counted_trials, \
    make_storage, open_study, suggest

POSTGRES_SH = Path(__file__).resolve().parents[3] / ".ci" / "postgres.sh"
needs_postgres = pytest.mark.skipif(
    not (POSTGRES_SH.exists() and any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))),
    reason="no PostgreSQL to start: needs the repository's .ci/postgres.sh and Debian's postgresql package")
WAITING = "does not answer"  # the warning line of a worker that waits for its storage

APP = '''
import time

import hydra
from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial


@hydra.main(config_path=".", config_name="config")
def objective(cfg):
    trial = current_trial()
    for step in range(1, cfg.steps + 1):
        time.sleep(cfg.seconds / cfg.steps)
        trial.report(cfg.x ** 2 + 1.0 / step, step, last=step == cfg.steps)
    return cfg.x ** 2


if __name__ == "__main__":
    objective()
'''


def lost(text: str = "server closed the connection unexpectedly") -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(text))


class FakeClock:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_lost_connection_is_retried_with_backoff_and_one_warning_line(caplog):
    clock = FakeClock()
    outage = Outage(20, "postgresql://user:secret@db/x", clock=clock, sleep=clock.sleep)
    answers = iter([lost(), lost("connection refused"), lost(), "done"])

    def step():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with caplog.at_level("WARNING", logger="optuna_pruning"):
        assert outage.call(step) == "done"
        assert outage.call(lambda: "next") == "next"
        (line,) = [r.getMessage() for r in caplog.records]  # one line for the outage
        answers = iter([lost(), "back"])
        assert outage.call(step) == "back"  # it answered for less than SAME_OUTAGE_S: the same outage
        assert len(caplog.records) == 1
        clock.now += 30
        answers = iter(["fine", lost(), "back"])
        assert outage.call(step) == "fine" and outage.call(step) == "back"  # another outage: another line
    assert clock.slept == [0.5, 1.0, 2.0, 0.5, 0.5]
    assert WAITING in line and "hydra.sweeper.storage_wait" in line and "secret" not in line
    assert len(caplog.records) == 2
    assert outage.recent(10)  # no heartbeat is judged stale right after an outage
    clock.now += 60
    assert not outage.recent(10)


def test_an_outage_longer_than_the_wait_and_a_refusal_are_raised():
    clock = FakeClock()
    outage = Outage(5, "postgresql://db/x", clock=clock, sleep=clock.sleep)

    def down():
        raise lost("connection refused")

    with pytest.raises(sqlalchemy.exc.OperationalError):
        outage.call(down)
    assert clock.now == pytest.approx(5)
    tries = []

    def read_only():  # the database answers, and says no: no outage, raised at once
        tries.append(1)
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("attempt to write a readonly database"))

    with pytest.raises(sqlalchemy.exc.OperationalError):
        outage.call(read_only)
    assert tries == [1]
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = lost()
    assert is_transient(wrapped) and not is_transient(ValueError("server closed the connection"))


def test_tables_of_another_optuna_schema_are_one_line_that_names_the_upgrade(tmp_path, monkeypatch):
    """Optuna's own schema check holds two connections, so the storage opens without it and checks here."""
    monkeypatch.setattr(optuna.storages.RDBStorage, "get_current_version", lambda self: "v2.4.0.a")
    with pytest.raises(ConfigError) as refused:
        make_storage(f"sqlite:///{tmp_path / 'old.db'}")
    assert "schema v2.4.0.a" in str(refused.value) and "optuna storage upgrade" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_claim_cut_off_before_its_trial_ran_is_withdrawn_from_the_budget(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = open_study(storage, "s", ["minimize"], optuna.samplers.RandomSampler(seed=0))
    study.ask()  # a claim whose process died (or lost the database) before it put its name on the trial
    space = {"x": FloatDistribution(0, 1)}
    (claimed,) = claim_trials(study, storage, 3, 1, lambda trials: False, lambda t: suggest(t, space))
    cut, mine = study.trials
    assert cut.state == TrialState.FAIL and "cut off" in cut.user_attrs[WITHDRAWN_ATTR]
    assert mine.number == claimed.number and mine.state == TrialState.RUNNING and WORKER_ATTR in mine.user_attrs
    assert budget_used(study) == 1 and [t.number for t in counted_trials(study)] == [mine.number]


# -- workers on a PostgreSQL that goes away ------------------------------------------------------------------------

@pytest.fixture
def postgres():
    """(its folder, its DSN): a throwaway PostgreSQL for this test alone (it is restarted and stopped)."""
    with own_postgres() as server:
        yield server


@contextmanager
def own_postgres(max_connections: int | None = None):
    """In a folder of its own under /tmp: the postgres user must reach it, and pytest's tmp_path is its owner's
    alone."""
    folder = Path(tempfile.mkdtemp(prefix="outage-pg-"))
    env = os.environ | ({"PG_MAX_CONNECTIONS": str(max_connections)} if max_connections else {})
    try:
        started = subprocess.run(["bash", str(POSTGRES_SH), "start", str(folder)], capture_output=True, text=True,
                                 env=env)
        assert started.returncode == 0, started.stderr[-2000:]
        yield folder, f"{started.stdout.strip()}/postgres"
    finally:
        subprocess.run(["bash", str(POSTGRES_SH), "stop", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def hold_every_connection(url: str) -> list:
    """Connections opened until PostgreSQL refuses one (max_connections) three times over 1.5 s, and kept: slots
    of clients that just left (a worker's exit, an engine garbage-collected) free up a moment later."""
    gc.collect()  # closes the pools of storages this process no longer uses
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    held, refused = [], 0
    while refused < 3:
        try:
            held.append(engine.connect())
            refused = 0
        except sqlalchemy.exc.OperationalError as e:
            assert "too many clients" in str(e)
            refused += 1
            time.sleep(0.5)
    return held


def pg(action: str, folder: Path) -> None:
    subprocess.run(["bash", str(POSTGRES_SH), action, str(folder)], check=True, capture_output=True)


def start_workers(app: Path, url: str, n: int, n_trials: int, wait_s: float, first: int = 0
                  ) -> list[subprocess.Popen]:
    """n copies of the same command on one study (the plugin README's *Workers*), one trial at a time each; each
    its own sweep folder (numbered from `first`)."""
    settings = [f"hydra.sweeper.storage='{url}'", "hydra.sweeper.study_name=s", "hydra.sweeper.total_budget=true",
                f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_jobs=1", "hydra.sweeper.heartbeat_interval=1",
                "hydra.sweeper.grace_period=3", f"hydra.sweeper.storage_wait={wait_s}", "x=interval(-5.0,5.0)"]
    return [subprocess.Popen([sys.executable, "app.py", "--multirun", *settings,
                              f"hydra.sweep.dir='{app / 'multirun' / str(first + i)}'"],
                             cwd=app, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


def complete(url: str) -> int:
    """COMPLETE trials of the study so far; 0 while the database or the study is not there."""
    try:
        return len(optuna.load_study(study_name="s", storage=url).get_trials(states=(TrialState.COMPLETE,)))
    except Exception:
        return 0


def claimed_by(url: str, pid: int) -> bool:
    try:
        trials = optuna.load_study(study_name="s", storage=url).trials
    except Exception:
        return False
    return any(t.user_attrs.get(WORKER_ATTR, "").endswith(f":{pid}") for t in trials)


def trial_states(url: str) -> list:
    try:
        return [(t.number, t.state.name, t.user_attrs.get(WITHDRAWN_ATTR) or t.user_attrs.get("fail_reason"),
                 t.system_attrs.get("failed_trial")) for t in optuna.load_study(study_name="s", storage=url).trials]
    except Exception as e:
        return [repr(e)]


def wait_for(condition, workers: list[subprocess.Popen], url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        ended = [w for w in workers if w.poll() is not None]
        assert not ended, f"a worker ended (exit {ended[0].returncode}): {ended[0].communicate()[0][-3000:]}" \
            f"\n{trial_states(url)}"
        assert time.time() < deadline, "the workers stalled"
        time.sleep(0.3)


def finish(workers: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """Each worker's exit code and output (its log lines and its error line together)."""
    results = []
    for w in workers:
        try:
            err, _ = w.communicate(timeout=timeout)
        finally:
            w.kill()
        results.append((w.returncode, err))
    return results


def assert_exact(url: str, n_trials: int) -> None:
    """The budget exactly: n_trials COMPLETE counted trials, distinct numbers, nothing left RUNNING."""
    study = optuna.load_study(study_name="s", storage=url)
    counted = counted_trials(study)
    states = [(t.number, t.state.name, t.user_attrs.get(WITHDRAWN_ATTR) or t.user_attrs.get("fail_reason"))
              for t in study.trials]
    assert [t.state for t in counted] == [TrialState.COMPLETE] * n_trials, states
    assert len({t.number for t in study.trials}) == len(study.trials), states
    assert TrialState.RUNNING not in [t.state for t in study.trials], states


@needs_postgres
@pytest.mark.slow
def test_workers_ride_out_two_restarts_and_an_outage_with_nothing_lost(postgres, tmp_path):
    """4 workers, 40 trials: PostgreSQL restarted twice (pg_ctl restart -m fast ends every session, the claim
    lock's too), a worker SIGKILLed mid-trial and replaced, and PostgreSQL stopped for 8 s. Every other worker ends
    with exit 0 and at most one warning line per outage; the study ends with exactly its budget. The last fault
    comes at 16 COMPLETE: the budget leaves room after it, or a busy machine's slow replacement worker would find
    it spent."""
    folder, url = postgres
    n_trials = 40
    app = write_app(tmp_path / "app", APP, {"x": 0.0, "seconds": 0.6, "steps": 3}, {"direction": "minimize"})
    workers = start_workers(app, url, 4, n_trials, wait_s=60)
    killed = workers[0]
    try:
        for done, fault in ((4, "restart"), (8, "kill"), (12, "restart"), (16, "outage")):
            wait_for(lambda: complete(url) >= done, [w for w in workers if w is not killed], url)
            if fault == "restart":
                pg("restart", folder)
            elif fault == "kill":  # its trial is failed and run again by another (same machine: at once)
                killed.kill()
                killed.wait()
                workers += start_workers(app, url, 1, n_trials, wait_s=60, first=4)
                # the new worker is at work before the next fault (one that starts while the database is down
                # stops at once, as for a wrong URL)
                wait_for(lambda: claimed_by(url, workers[-1].pid), workers[1:], url)
            else:
                pg("down", folder)
                time.sleep(8)
                pg("up", folder)
        results = finish([w for w in workers if w is not killed])
    finally:
        for w in workers:
            w.kill()
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
        assert err.count(WAITING) <= 3, err[-3000:]  # one line per outage it saw at most
    assert any(WAITING in err for _, err in results)
    assert_exact(url, n_trials)


@needs_postgres
@pytest.mark.slow
def test_an_outage_longer_than_storage_wait_stops_each_worker_with_one_line_and_the_command_resumes(
        postgres, tmp_path):
    folder, url = postgres
    app = write_app(tmp_path / "app", APP, {"x": 0.0, "seconds": 1.0, "steps": 4}, {"direction": "minimize"})
    workers = start_workers(app, url, 2, 8, wait_s=2)
    try:
        wait_for(lambda: complete(url) >= 2, workers, url)
        pg("down", folder)
        results = finish(workers, timeout=60)
    finally:
        for w in workers:
            w.kill()
        pg("up", folder)
    for code, err in results:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in err and err.count(WAITING) == 1, err[-3000:]
        assert len(errors) == 1 and "run the same command again to resume" in errors[0], err[-3000:]
    (again,) = start_workers(app, url, 1, 8, wait_s=2)
    ((code, err),) = finish([again])
    assert code == 0, err[-3000:]
    assert_exact(url, 8)


def client_connections(url: str) -> int:
    """Client sessions on the database of `url`, less the one that counts them."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        return conn.execute(sqlalchemy.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'")).scalar()


@needs_postgres
@pytest.mark.slow
def test_a_worker_holds_one_connection_the_claim_lock_included(postgres, tmp_path):
    """6 workers on one study, counted from pg_stat_activity while they claim, report and beat: never more
    connections than workers (the claim lock's session is the one a worker's queries use)."""
    folder, url = postgres
    app = write_app(tmp_path / "app", APP, {"x": 0.0, "seconds": 0.3, "steps": 3}, {"direction": "minimize"})
    workers = start_workers(app, url, 6, 30, wait_s=30)
    peak = 0
    try:
        while any(w.poll() is None for w in workers):
            peak = max(peak, client_connections(url))
            time.sleep(0.05)
        results = finish(workers, timeout=60)
    finally:
        for w in workers:
            w.kill()
    assert all(code == 0 for code, _ in results), results
    assert_exact(url, 30)
    assert 2 <= peak <= 6, f"{peak} connections for 6 workers"


@needs_postgres
@pytest.mark.slow
def test_more_workers_than_max_connections_allows_wait_or_stop_with_one_line(tmp_path, monkeypatch):
    """10 workers on a PostgreSQL that takes 8 connections (a worker holds 1): those refused wait
    for room with one line, then join or, after the wait, stop with one line naming max_connections; nobody prints
    a traceback, and the study ends with exactly its budget. Then one that finds no room for longer than the wait:
    one line."""
    with own_postgres(max_connections=8) as (folder, url):
        app = write_app(tmp_path / "app", APP, {"x": 0.0, "seconds": 0.3, "steps": 3}, {"direction": "minimize"})
        workers = start_workers(app, url, 10, 12, wait_s=30)
        try:
            results = finish(workers, timeout=150)
        finally:
            for w in workers:
                w.kill()
        assert_exact(url, 12)
        held = hold_every_connection(url)  # a worker that waits longer than the wait: one line, no traceback
        monkeypatch.setattr(studies, "RESTART_WAIT_S", 1)
        with pytest.raises(ConfigError, match="max_connections is reached: each sweeper process") as refused:
            studies.make_storage(url + "?application_name=late")
        for conn in held:
            conn.close()
    assert "\n" not in str(refused.value)
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 0 or (len(errors) == 1 and "max_connections" in errors[0]), err[-3000:]
    assert any("no free connection" in err or "max_connections" in err for _, err in results)
    assert sum(code == 0 for code, _ in results) >= 1

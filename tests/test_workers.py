"""Many workers on one study: the same `--multirun` command in several processes, sharing the study's budget, its
pruner and its MLflow parent run; a killed worker's trial is picked up; an unreachable database or tracking
server stops a worker before it trains. Local workers (`hydra.sweeper.local_workers`): the sweep starts n_jobs
such processes itself and waits for them.

The PostgreSQL tests need a server: `.ci/run` starts a throwaway one and sets MNIST_SWEEP_TEST_PG to its DSN
(postgresql://user@host:port, no database); each test creates its own database. Without it they skip.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO, cli_args, free_port, migrated_mlflow_store, mlflow_runs, run_cli
from conftest import mlflow_server as start_mlflow_server
from mnist_sweep.errors import Terminated
from hydra_plugins.hydra_optuna_pruning_sweeper._local_workers import LocalWorker, Workers, worker_command, worker_env
from hydra_plugins.hydra_optuna_pruning_sweeper._names import FAIL_REASON_ATTR, STORAGE_ENV, WORKER_ATTR
from hydra_plugins.hydra_optuna_pruning_sweeper._study import claim_lock, counted_trials, make_storage
from hydra_plugins.hydra_optuna_pruning_sweeper._trial import TrialRef, TrialReport

PG = os.environ.get("MNIST_SWEEP_TEST_PG")
needs_pg = pytest.mark.skipif(not PG, reason="no PostgreSQL: set MNIST_SWEEP_TEST_PG=postgresql://user@host:port "
                                             "(.ci/run starts one)")
SPACE = ["~hparams_search", "model.dropout=interval(0.1,0.6)", "optimizer.lr=tag(log,interval(0.1,1.0))"]
FAST_BEAT = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]


def new_database(prefix: str) -> str:
    """A fresh database on the test server; returns its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG}/{name}"


@pytest.fixture
def pg_url():
    return new_database("optuna")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a PostgreSQL backend, as the README tells users to run it (conftest.MlflowServer)."""
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    with start_mlflow_server(new_database("mlflow"), "--artifacts-destination", str(artifacts)) as server:
        yield server


def worker_args(tmp_path, mnist_root, storage: str, name: str, *extra: str) -> list[str]:
    migrated_mlflow_store(tmp_path)
    return ["--multirun", *cli_args(tmp_path, mnist_root, "trainer.epochs=1", *SPACE), f"storage.url={storage}",
            "hydra.sweeper.study_name=s", f"hydra.sweeper.best_config_dir={tmp_path / 'configs'}",
            f"hydra.sweep.dir={tmp_path / 'outputs' / name}", *extra]


def start_worker(args: list[str], cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_ROOT": str(cwd / "no-such-data")}
    return subprocess.Popen([sys.executable, "-m", "mnist_sweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(workers: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    results = []
    for w in workers:
        try:
            _, err = w.communicate(timeout=timeout)
        finally:
            w.kill()
        results.append((w.returncode, err))
    return results


def run_workers(n: int, tmp_path, mnist_root, storage: str, *extra: str) -> tuple[list[tuple[int, str]], float]:
    """n workers on one study, started together; returns their (exit code, stderr) and the wall-clock seconds."""
    start = time.perf_counter()
    workers = [start_worker(worker_args(tmp_path, mnist_root, storage, f"w{i}", *extra), tmp_path) for i in range(n)]
    results = finish(workers)
    return results, time.perf_counter() - start


def assert_exact_budget(study: optuna.Study, n_trials: int) -> None:
    """n_trials counted trials, all finished, none run twice: distinct numbers and distinct params."""
    counted = counted_trials(study)
    assert len(counted) == n_trials, [(t.number, t.state) for t in study.trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted), \
        [(t.number, t.state.name, t.user_attrs.get(FAIL_REASON_ATTR)) for t in study.trials]
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    assert len({t.number for t in counted}) == n_trials
    assert len({tuple(sorted(t.params.items())) for t in counted}) == n_trials


def finished_trials(url: str) -> int:
    """Trials of study 's' that have ended so far; 0 before the study exists."""
    try:
        return sum(t.state.is_finished() for t in optuna.load_study(study_name="s", storage=url).trials)
    except KeyError:
        return 0


def study_runs(client, runs, study: optuna.Study):
    """The study's one parent run and its children, checked against the study's trials."""
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_id for r in runs} == {parent.info.run_id} | {c.info.run_id for c in children}
    assert all(r.info.status != "RUNNING" for r in runs)
    return parent, children


@needs_pg
@pytest.mark.slow
def test_three_workers_share_one_study_and_its_budget_exactly_through_a_tracking_server_restart(
        tmp_path, mnist_root, pg_url, mlflow_server):
    """The tracking server is restarted once a trial is done: the workers' MLflow calls wait for it (MLflow's
    own retries), the trials that ran across the restart log into it and end their runs, and none is left
    RUNNING."""
    from mlflow.tracking import MlflowClient

    n_trials = 6
    start = time.perf_counter()
    workers = [start_worker(worker_args(tmp_path, mnist_root, pg_url, f"w{i}", "storage=postgres",
                                        f"hydra.sweeper.n_trials={n_trials}", f"mlflow.tracking_uri={mlflow_server.url}",
                                        "mlflow.experiment=three_workers"), tmp_path) for i in range(3)]
    try:
        deadline = time.time() + 240
        while finished_trials(pg_url) < 1 and all(w.poll() is None for w in workers) and time.time() < deadline:
            time.sleep(0.5)
        restarted_at = time.time()
        mlflow_server.restart()
    finally:
        results = finish(workers)
    print(f"3 workers, {n_trials} trials, a tracking server restart: {time.perf_counter() - start:.1f} s")
    assert [code for code, _ in results] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert all("Traceback" not in err for _, err in results), [err[-2000:] for _, err in results]
    study = optuna.load_study(study_name="s", storage=pg_url)
    assert_exact_budget(study, n_trials)
    assert len(study.trials) == n_trials  # nothing retried, nothing over budget
    assert len({t.user_attrs[WORKER_ATTR] for t in study.trials}) >= 2  # they did run side by side
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("three_workers")
    parent, children = study_runs(client, client.search_runs([exp.experiment_id], max_results=100), study)
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == list(range(n_trials))
    assert all("val/acc" in c.data.metrics for c in children)
    # trials that ran across the restart ended their runs after it (MLflow stamps the time on the client side)
    assert any(c.info.end_time / 1000 > restarted_at for c in children)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {c.info.run_id for c in children}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] + \
        parent.data.metrics["trials/pruned"] == n_trials


@needs_pg
@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_rerun_by_another(tmp_path, mnist_root, pg_url, mlflow_server):
    """Worker A trains slowly and is SIGKILLed mid-trial; worker B spends the rest of the budget, waits for A's
    trial to go stale, fails it and runs its re-queued copy: the study still ends with its budget."""
    common = ["storage=postgres", "hydra.sweeper.n_trials=3", f"mlflow.tracking_uri={mlflow_server.url}",
              "mlflow.experiment=killed_worker", *FAST_BEAT]
    slow = start_worker(worker_args(tmp_path, mnist_root, pg_url, "a", *common, "trainer.epochs=60"), tmp_path)
    fast = None

    def trial_of(proc, training: bool):
        """The RUNNING trial `proc` claimed (and has reported an epoch of, if `training`), else None."""
        try:
            trials = optuna.load_study(study_name="s", storage=pg_url).trials
        except KeyError:
            return None
        worker = f"{socket.gethostname()}:{proc.pid}"
        return next((t for t in trials if t.user_attrs.get(WORKER_ATTR) == worker
                     and t.state == TrialState.RUNNING and (t.intermediate_values or not training)), None)

    deadline = time.time() + 180
    while (killed := trial_of(slow, training=True)) is None:  # A has claimed a trial and trains it
        assert time.time() < deadline and slow.poll() is None, "worker A never trained a trial"
        time.sleep(0.5)
    fast = start_worker(worker_args(tmp_path, mnist_root, pg_url, "b", *common), tmp_path)
    while trial_of(fast, training=False) is None:  # B runs beside A
        assert time.time() < deadline and fast.poll() is None, "worker B never claimed a trial"
        time.sleep(0.5)
    slow.send_signal(signal.SIGKILL)
    (code_a, _), (code_b, err_b) = finish([slow, fast])
    assert code_a == -signal.SIGKILL and code_b == 0, err_b[-3000:]
    study = optuna.load_study(study_name="s", storage=pg_url)
    assert_exact_budget(study, 3)
    assert study.trials[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("killed_worker")
    _, children = study_runs(client, client.search_runs([exp.experiment_id], max_results=100), study)
    killed_runs = [c for c in children if c.data.tags["trial_number"] == str(killed.number)]
    assert [r.info.status for r in killed_runs] == ["KILLED"]  # closed by worker B, not left RUNNING


@pytest.mark.slow
def test_two_sweeps_at_once_on_one_sqlite_file_share_the_budget(tmp_path, mnist_root):
    """The same budget lock serves SQLite (an flock beside the file): two sweeps started together run n_trials."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    results, _ = run_workers(2, tmp_path, mnist_root, storage, "hydra.sweeper.n_trials=4")
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    study = optuna.load_study(study_name="s", storage=storage)
    assert_exact_budget(study, 4)
    assert len(study.trials) == 4
    client, runs = mlflow_runs(tmp_path)
    _, children = study_runs(client, runs, study)
    assert len(children) == 4


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=needs_pg)])
def test_pruning_judges_a_trial_against_other_workers_trials(tmp_path, backend):
    """Two trials reported by another process (another worker) make the median; this process's trial, worse at
    epoch 1, is pruned by it."""
    import json


    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else new_database("pruning")
    other_worker = (f"import optuna; s = optuna.create_study(study_name='p', storage={url!r}, direction='maximize')\n"
                    "for v in (0.8, 0.9):\n"
                    "    t = s.ask(); t.report(v, step=1); s.tell(t, v)\n")
    subprocess.run([sys.executable, "-c", other_worker], check=True, timeout=60)
    study = optuna.load_study(study_name="p", storage=url)
    mine = study.ask()
    pruner = json.dumps({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 0})
    with pytest.raises(optuna.TrialPruned):
        TrialReport(TrialRef(url, "p", mine.number, pruner)).report(0.5, step=1)
    better = study.ask()
    TrialReport(TrialRef(url, "p", better.number, pruner)).report(0.95, step=1)  # better than the median: goes on


def test_a_trials_last_step_is_recorded_but_never_pruned(tmp_path):
    """Successive halving judges every rung, the last epoch too (a rung at 9 of a 9-epoch trial): a trial that
    finished its epochs must end COMPLETE with its value, not be thrown away as PRUNED at its final step."""
    import json


    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="sh", storage=url, direction="maximize")
    pruner = json.dumps({"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1,
                         "reduction_factor": 3})

    def run(values: dict[int, float], last: bool) -> None:
        report = TrialReport(TrialRef(url, "sh", study.ask().number, pruner))
        for step, value in values.items():
            report.report(value, step=step, last=last and step == 9)

    for _ in range(2):  # two trials at 0.99 through every rung (1, 3, 9 epochs), judged at each
        run({1: 0.99, 3: 0.99, 9: 0.99}, last=False)
    run({1: 0.995, 3: 0.995, 9: 0.5}, last=True)  # past rungs 1 and 3, worst at 9, but its last step: no pruning
    with pytest.raises(optuna.TrialPruned, match="pruned at step 9"):
        run({1: 0.995, 3: 0.995, 9: 0.5}, last=False)  # the same values with more steps to come: pruned at 9


class SilentServer:
    """A TCP port that accepts connections and never answers: a database or server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


@pytest.fixture
def silent_port():
    server = SilentServer()
    yield server.port
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stopped", "hanging"])
def test_an_unreachable_database_stops_a_worker_at_once_naming_the_url(tmp_path, mnist_root, fault, silent_port):
    """A stopped server refuses the connection; a hanging one is cut off by the connect timeout (5 s)."""
    port = free_port() if fault == "stopped" else silent_port
    url = f"'postgresql://someone:${{oc.env:MNIST_TEST_SECRET}}@127.0.0.1:{port}/mnist'"
    start = time.perf_counter()
    result = run_cli(worker_args(tmp_path, mnist_root, url, "w", "storage=postgres"), cwd=tmp_path,
                     env={"MNIST_TEST_SECRET": "secret"})
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert f"Optuna storage 'postgresql://someone:***@127.0.0.1:{port}/mnist'" in line and "secret" not in line
    assert "Traceback" not in result.stderr
    assert seconds < 30  # start-up plus at most the connect timeout: no retrying for minutes
    assert mlflow_runs(tmp_path)[1] == []  # nothing trained, nothing recorded


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stopped", "hanging"])
def test_an_unreachable_tracking_server_stops_a_worker_at_once(tmp_path, mnist_root, fault, silent_port):
    port = free_port() if fault == "stopped" else silent_port
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    start = time.perf_counter()
    result = run_cli(worker_args(tmp_path, mnist_root, storage, "w", f"mlflow.tracking_uri=http://127.0.0.1:{port}"),
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: MLflow tracking server 'http://127.0.0.1:{port}' (mlflow.tracking_uri) cannot be reached" \
        in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - start < 30
    assert optuna.get_all_study_summaries(storage) == []  # no study, no trial


def test_the_budget_lock_serializes_claims_between_processes(tmp_path):
    """While one process holds a study's claim lock, another process cannot take it (it waits)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    other = ("import sys; from hydra_plugins.hydra_optuna_pruning_sweeper._study import claim_lock, make_storage\n"
             f"storage = make_storage({url!r}); print('ready', flush=True); sys.stdin.readline()\n"
             "with claim_lock(storage, 's'): print('got it', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", other], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(60, proc.kill)
    timer.start()
    try:
        assert proc.stdout.readline().strip() == "ready"
        with claim_lock(make_storage(url), "s"):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            time.sleep(2)
            assert proc.poll() is None  # still waiting for the lock
        assert proc.communicate(timeout=30)[0].strip() == "got it"
    finally:
        timer.cancel()
        proc.kill()


# -- local workers: n_jobs processes started by the sweep itself ----------------------------------------------------

LOCAL = ["hydra.sweeper.n_jobs=2", "hydra.sweeper.local_workers=true"]


def test_a_local_worker_reruns_the_same_command_into_the_same_sweep_folder():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    argv = ["python3", "-X", "utf8", "app.py", "--multirun", "x=interval(0,1)", "hydra.sweep.dir=runs/${now:%H}"]
    command = worker_command(argv, "/venv/bin/python", REPO / "it's, here")
    assert command[:-1] == ["/venv/bin/python", *argv[1:]]  # this interpreter, its options, the app, the overrides
    last = OverridesParser.create().parse_override(command[-1])  # the last hydra.sweep.dir wins in Hydra
    assert last.key_or_group == "hydra.sweep.dir" and last.value() == str(REPO / "it's, here")


def test_a_local_workers_environment_holds_its_study_and_its_share_of_the_cores():
    env = {STORAGE_ENV: "postgresql://u:secret@h/db", "PATH": "/bin"}
    me = LocalWorker("s", 8, 5)
    got = worker_env(env, me, n_jobs=2, cores=8)
    assert got[STORAGE_ENV] == env[STORAGE_ENV] and got["PATH"] == "/bin"  # inherited, not on argv
    assert got["OMP_NUM_THREADS"] == "4" and LocalWorker.from_env(got) == me
    assert worker_env(env | {"OMP_NUM_THREADS": "3"}, me, 2, 8)["OMP_NUM_THREADS"] == "3"  # the user's wins
    assert worker_env(env, me, 4, 2)["OMP_NUM_THREADS"] == "1"
    assert LocalWorker.from_env(env) is None  # the sweep's main process, and any process outside a sweep


# A stand-in for a worker: ROLE_DIR hands out roles in start order (the first to ask gets "first"); START_S is its
# start-up (imports, config), during which signals are held; then it fails, sleeps or exits as its role says.
CHILD = """
import os, sys, time
from hydra_plugins.hydra_optuna_pruning_sweeper._local_workers import LocalWorker, stop_once_on_signals
me = LocalWorker.from_env(os.environ)
try:
    os.close(os.open(os.path.join(os.environ["ROLE_DIR"], "first"), os.O_CREAT | os.O_EXCL))
    role = os.environ["FIRST"]
except FileExistsError:
    role = os.environ["OTHERS"]
time.sleep(float(os.environ["START_S"]))
try:
    stop_once_on_signals()
    if role == "fail":
        me.report("error: the first worker says why")
        sys.exit(2)
    time.sleep(float(role))
except KeyboardInterrupt as e:
    time.sleep(0.5)  # cleaning up: a second signal now must not cut it short
    open(os.path.join(os.environ["ROLE_DIR"], str(os.getpid())), "w").write(type(e).__name__)
    sys.exit(143 if type(e).__name__ == "Terminated" else 130)
"""


def start_children(tmp_path, first: str, others: str, start_s: float = 0.0, on_death=lambda proc: None) -> Workers:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ROLE_DIR": str(tmp_path), "FIRST": first, "OTHERS": others,
           "START_S": str(start_s)}
    return Workers.start(2, [sys.executable, "-c", CHILD], str(tmp_path), env, "s", 4, os.cpu_count(), on_death)


def cleanup_of(tmp_path, proc) -> str | None:
    path = tmp_path / str(proc.pid)
    return path.read_text() if path.exists() else None


def test_a_failing_local_worker_stops_the_others_and_its_line_is_passed_on(tmp_path):
    deaths = []
    with start_children(tmp_path, first="fail", others="60", on_death=deaths.append) as workers:
        failed = workers.wait()
        lines = workers.failure_lines()
    (other,) = [p for p in workers.procs if p is not failed]
    assert failed.returncode == 2 and lines == ["error: the first worker says why"]
    assert other.returncode == 143 and cleanup_of(tmp_path, other) == "Terminated"  # stopped cleanly, at once
    assert deaths == []


def raise_terminated(signum, frame):  # SIGTERM as the CLI takes it
    raise Terminated()


def test_sigterm_to_the_sweep_reaches_its_local_workers_even_while_they_start(tmp_path):
    """SIGTERM comes while the workers still start (2 s): they hold it, then end the clean way; the sweep waits
    for them and ends with the same exception, so its parent run ends KILLED."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # a late signal must not end pytest
    try:
        with pytest.raises(Terminated):
            with start_children(tmp_path, first="60", others="60", start_s=2.0) as workers:
                threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
                workers.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.returncode for p in workers.procs] == [143, 143]
    assert [cleanup_of(tmp_path, p) for p in workers.procs] == ["Terminated", "Terminated"]


def test_a_killed_local_worker_is_reported_and_the_others_go_on(tmp_path):
    deaths = []
    with start_children(tmp_path, first="3", others="3", on_death=deaths.append) as workers:
        threading.Timer(1.0, workers.procs[0].kill).start()
        assert workers.wait() is None  # no failure: the other worker ends its work
    assert deaths == [workers.procs[0]] and workers.procs[0].returncode == -signal.SIGKILL
    assert workers.procs[1].returncode == 0


def test_a_killed_local_workers_trial_is_failed_at_once_and_queued_again(tmp_path):
    """The main process knows its worker is dead: no grace period to wait out, no heartbeat needed."""
    from hydra_plugins.hydra_optuna_pruning_sweeper._recovery import Recovery
    from hydra_plugins.hydra_optuna_pruning_sweeper._tracker import NullTracker

    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    for worker in ("host:1", "host:2"):
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr(WORKER_ATTR, worker)
    recovery = Recovery(study, storage, NullTracker())
    assert recovery.dead_worker("host:1", "its local worker process 1 was killed") == [0]
    dead, alive, retry = study.trials
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"] == "its local worker process 1 was killed"
    assert alive.state == TrialState.RUNNING  # another worker's trial is left alone
    assert retry.state == TrialState.WAITING and retry.params == dead.params and retry.system_attrs["failed_trial"] == 0


@pytest.mark.slow
def test_local_workers_run_a_sweep_and_the_sweep_summarizes_it_once(tmp_path, mnist_root):
    """The main process only composes, makes the study and the parent run, waits and summarizes: its workers
    train, and it never imports torch. (Registering the best model at the end needs torch; the FAST overrides
    register none.)"""
    (tmp_path / "sweep.py").write_text(MAIN_PROCESS_REPORT)  # `python -m mnist_sweep`, saying what it imported
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_ROOT": str(tmp_path / "no-such-data"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "sweep.py", *worker_args(tmp_path, mnist_root, storage, "sweep",
                                                                       "hydra.sweeper.n_trials=4", *LOCAL)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert "main process imported: neither" in result.stderr, result.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=storage)
    assert_exact_budget(study, 4)
    assert len(study.trials) == 4
    pids = re.search(r"2 local worker processes \(pids (\d+), (\d+)\)", out).groups()
    assert {t.user_attrs[WORKER_ATTR] for t in study.trials} == {f"{socket.gethostname()}:{p}" for p in pids}
    client, runs = mlflow_runs(tmp_path)
    parent, children = study_runs(client, runs, study)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] == 4
    # the main process summarizes, once; each job's folder is named by its trial
    assert out.count("best config written to") == 1 and (tmp_path / "configs" / "experiment" / "s_best.yaml").exists()
    folder = tmp_path / "outputs" / "sweep"
    assert (folder / "optimization_results.yaml").exists()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_a_config_error_in_local_workers_is_one_line_and_leaves_nothing_running(tmp_path, mnist_root):
    """Both workers' first trials hit the same config error at once: one `error:` line, exit 2."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli(worker_args(tmp_path, mnist_root, storage, "sweep", "hydra.sweeper.n_trials=4",
                                 "model.conv1_channels=0", *LOCAL), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "model.conv1_channels=0 must be >= 1" in line
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert trials and TrialState.RUNNING not in [t.state for t in trials]
    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert [p.info.status for p in parents] == ["FAILED"] and all(r.info.status != "RUNNING" for r in runs)


MAIN_PROCESS_REPORT = """
import atexit, os, sys

from hydra_plugins.hydra_optuna_pruning_sweeper._names import LOCAL_WORKER_ENV

def report():
    if not os.environ.get(LOCAL_WORKER_ENV):  # the sweep's main process, not one of its workers
        heavy = [m for m in ("torch", "torchvision") if m in sys.modules]
        print(f"main process imported: {' '.join(heavy) or 'neither'}", file=sys.stderr)

atexit.register(report)
from mnist_sweep.__main__ import cli
cli()
"""


def test_what_a_sweeps_main_process_imports_brings_no_torch():
    """The modules a sweep's main process runs (the entry point, the sweeper, its MLflow records, the on_best hook)
    load without torch, in a fresh interpreter: torch comes with the first run, in a worker."""
    code = ("import sys; import mnist_sweep.__main__, mnist_sweep.registry, mnist_sweep.config; import hydra_plugins.hydra_optuna_pruning_sweeper._sweeper; "
            "print(' '.join(m for m in ('torch', 'torchvision') if m in sys.modules) or 'neither')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "neither"

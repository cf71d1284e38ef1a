"""SLURM: sweeps through `hydra/launcher=slurm` and workers as `sbatch` jobs, against a real one-node cluster.

The cluster tests need one: `.ci/run` starts it (`bash .ci/slurm.sh start DIR`, Debian's SLURM 22.05 with munge and
slurmdbd) and sets MNIST_SWEEP_TEST_SLURM to its slurm.conf; without it they skip. What a job sees of the cluster
is asserted through `sacct`, as an admin would. The unit tests at the end need only the submitit plugin.
"""

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO, cli_args, free_port, migrated_mlflow_store, mlflow_runs, run_cli
from hydra_plugins.hydra_optuna_pruning_sweeper._names import WORKER_ATTR
from hydra_plugins.hydra_optuna_pruning_sweeper._study import counted_trials

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)")

SLURM_CONF = os.environ.get("MNIST_SWEEP_TEST_SLURM")
needs_slurm = pytest.mark.skipif(not SLURM_CONF or not Path(SLURM_CONF).is_file(),
                                 reason="no SLURM cluster: set MNIST_SWEEP_TEST_SLURM=<its slurm.conf> "
                                        "(.ci/run starts one: bash .ci/slurm.sh start DIR)")
SPACE = ["~hparams_search", "model.dropout=interval(0.1,0.6)", "optimizer.lr=tag(log,interval(0.1,1.0))"]
ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


@pytest.fixture
def slurm(monkeypatch) -> str:
    """The test cluster's slurm.conf, in SLURM_CONF for this process and the CLI runs it starts; returns a job
    name unique to the test (hydra.launcher.name, sbatch --job-name), which sacct filters on."""
    monkeypatch.setenv("SLURM_CONF", SLURM_CONF)
    return f"t{uuid.uuid4().hex[:10]}"


def launcher_args(name: str) -> list[str]:
    """hydra/launcher=slurm sized for the 2-core test node: one core, 1 GiB and 10 minutes per trial's job."""
    return ["hydra/launcher=slurm", f"hydra.launcher.name={name}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


def sweep_args(tmp_path, mnist_root, *extra) -> list[str]:
    migrated_mlflow_store(tmp_path)
    return ["--multirun", *cli_args(tmp_path, mnist_root), f"hydra.sweeper.storage={storage(tmp_path)}",
            "hydra.sweeper.study_name=s", f"hydra.sweeper.best_config_dir={tmp_path / 'configs'}", *extra]


def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def load(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=storage(tmp_path))


def sacct(name: str, expected: int, timeout: float = 30) -> dict[str, str]:
    """{job id: state} of the jobs named `name` (array tasks as 12_0), once `expected` of them have ended: the
    controller sends the records to slurmdbd a moment after a job ends."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", f"--name={name}", "-S", "now-1hours"],
                             capture_output=True, text=True, timeout=30).stdout
        jobs = dict(line.split("|", 1) for line in out.splitlines() if line.strip())
        if sum(state.startswith(ENDED) for state in jobs.values()) >= expected or time.time() > deadline:
            return jobs
        time.sleep(1)


def runs_by_trial(tmp_path):
    """The study's parent run and its child runs by trial number (every run of the store is one of them)."""
    _, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    children = {int(r.data.tags["trial_number"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert len(children) == len(runs) - 1  # nothing outside the study's tree
    return parents[0], children


@needs_slurm
@pytest.mark.slow
def test_a_sweep_through_slurm_runs_each_trial_as_a_job_prunes_and_nests_its_runs(tmp_path, mnist_root, slurm):
    # Random sampler, seed 0, draws lr = 1, 1e-6, 1, 1: two batches of two jobs side by side on the two cores. A
    # threshold pruner judges each trial alone (a median would depend on which job of a batch ends first), so
    # the hopeless trial (Adadelta at lr 1e-6, chance accuracy) is pruned from inside its job after epoch 1
    result = run_cli(sweep_args(tmp_path, mnist_root, *launcher_args(slurm), "~hparams_search",
                                "optimizer.lr=choice(1e-6,1.0)", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                                "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                                "hydra/sweeper/pruner=none", "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
                                "+hydra.sweeper.pruner.lower=0.3"), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    assert len(study.trials) == 4 and len(counted_trials(study)) == 4  # exactly n_trials, none retried
    hopeless = [t for t in study.trials if t.params["optimizer.lr"] == 1e-6]
    assert hopeless, [t.params for t in study.trials]
    # stopped at epoch 1 of 2, in its job; the others trained both epochs
    assert all(t.state == TrialState.PRUNED and len(t.intermediate_values) == 1 for t in hopeless)
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t not in hopeless)
    states = {t.number: t.state for t in study.trials}
    # every trial was a SLURM job: two array jobs of two tasks, all COMPLETED (a pruned trial's job ends normally)
    jobs = sacct(slurm, 4)
    assert sorted(jobs.values()) == ["COMPLETED"] * 4, jobs
    assert len({job.split("_")[0] for job in jobs}) == 2
    parent, children = runs_by_trial(tmp_path)
    assert parent.info.status == "FINISHED" and sorted(children) == [0, 1, 2, 3]
    assert {n: c.data.tags["trial_state"] for n, c in children.items()} == {n: s.name for n, s in states.items()}
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {c.info.run_id for c in children.values()}


@needs_slurm
@pytest.mark.slow
def test_a_cancelled_job_and_one_out_of_time_fail_their_trials_whose_parameters_run_once_more(tmp_path, mnist_root,
                                                                                             slurm):
    """Two trials' jobs side by side, stopped mid-training from outside: one by scancel, one by its time limit.
    Each trial FAIL with its reason, its MLflow run KILLED, its parameters queued again and run as a new job; the
    study ends with its budget and nothing RUNNING. (One sweep for both ways: each costs a job's life.)"""
    args = sweep_args(tmp_path, mnist_root, *launcher_args(slurm), *SPACE, "trainer.epochs=50",
                      "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/sweeper/pruner=none")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_ROOT": str(tmp_path / "no-such-data")}
    proc = subprocess.Popen([sys.executable, "-m", "mnist_sweep", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not trials_train(tmp_path, 2):  # both jobs run and have reported an epoch: mid-training
            assert proc.poll() is None and time.time() < deadline, "the trials never started training"
            time.sleep(0.5)
        cancelled_job, timed_out_job = subprocess.run(["squeue", "-h", f"--name={slurm}", "-o", "%i"],
                                                      capture_output=True, text=True, check=True).stdout.split()
        # stopped first (SIGSTOP to its processes; the job stays RUNNING) at its first epochs. scancel resumes it
        # with SIGCONT and SIGTERM, which submitit ignores, and SIGKILL ends it about 5 s later here: 50 epochs
        # (about 12 s here) leave it mid-training
        for job in (cancelled_job, timed_out_job):
            subprocess.run(["scancel", "--signal=STOP", job], check=True)
        subprocess.run(["scancel", cancelled_job], check=True)
        # the limit moved to now: slurmctld's next time-limit check (every 30 s) ends the job as TIMEOUT
        subprocess.run(["scontrol", "update", f"JobId={timed_out_job}", "EndTime=now"], check=True)
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("its parameters run again once") == 2, output[-3000:]
    study = load(tmp_path)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    retries = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in failed] == [0, 1] and len(retries) == 2, [(t.number, t.state) for t in study.trials]
    reasons = " | ".join(t.user_attrs["fail_reason"] for t in failed)
    assert re.search(rf"JobInterrupted: SLURM job {re.escape(cancelled_job)} ended CANCELLED", reasons), reasons
    # at its time limit SLURM signals the job first, and submitit's handler inside it says so
    assert re.search(rf"JobInterrupted: SLURM job {re.escape(timed_out_job)} (ended TIMEOUT|reached its time limit)",
                     reasons), reasons
    assert all(len(t.intermediate_values) < 50 for t in failed)  # stopped mid-training
    assert sorted(t.system_attrs.get("failed_trial") for t in retries) == [0, 1]
    assert all(r.params == study.trials[r.system_attrs["failed_trial"]].params for r in retries)
    assert len(counted_trials(study)) == 2
    parent, children = runs_by_trial(tmp_path)
    assert all(children[t.number].info.status == "KILLED" and children[t.number].data.tags["trial_state"] == "FAIL"
               for t in failed)
    assert all(children[t.number].info.status == "FINISHED" for t in retries) and parent.info.status == "FINISHED"
    jobs = sacct(slurm, 4)
    assert jobs.pop(cancelled_job, "").startswith("CANCELLED"), jobs
    assert jobs.pop(timed_out_job, "").startswith("TIMEOUT"), jobs
    assert list(jobs.values()) == ["COMPLETED"] * 2, jobs


def trials_train(tmp_path, n: int) -> bool:
    """The first n trials of the study run and have each reported an epoch."""
    try:
        trials = load(tmp_path).trials[:n]
    except Exception:  # no study yet, or the database is being written
        return False
    return len(trials) == n and all(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)


@needs_slurm
@pytest.mark.slow
def test_worker_jobs_from_the_sbatch_script_share_one_study_and_its_budget(tmp_path, mnist_root, slurm):
    """scripts/sweep_workers.sbatch as the README runs it, an array of 2 workers, each the claim loop of
    `python -m mnist_sweep --multirun` on one study: the budget is met exactly, by both."""
    n_trials = 6
    args = [a for a in sweep_args(tmp_path, mnist_root, *SPACE, "trainer.epochs=1", f"hydra.sweeper.n_trials={n_trials}")
            if not a.startswith("hydra.sweep.dir=")]  # the script gives each worker its own folder
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MNIST_ROOT": str(tmp_path / "no-such-data"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # an activated venv
    submitted = subprocess.run(["sbatch", "--parsable", "--array=0-1", f"--job-name={slurm}", "--cpus-per-task=1",
                                "--mem=1G", "--time=10", str(REPO / "scripts" / "sweep_workers.sbatch"), *args],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip().split(";")[0]
    jobs = sacct(slurm, 2, timeout=240)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("slurm-*.out")))
    assert jobs == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}, (jobs, logs)
    assert sorted(p.name for p in (tmp_path / "outputs" / "workers" / array).iterdir()) == ["0", "1"]
    study = load(tmp_path)
    assert len(study.trials) == n_trials and len(counted_trials(study)) == n_trials
    assert all(t.state == TrialState.COMPLETE for t in study.trials), [(t.number, t.state) for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == n_trials
    assert len({t.user_attrs[WORKER_ATTR] for t in study.trials}) == 2, logs  # both workers trained
    parent, children = runs_by_trial(tmp_path)
    assert sorted(children) == list(range(n_trials)) and parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children.values())


@needs_slurm
@pytest.mark.slow
def test_a_cluster_that_does_not_answer_is_one_error_line_before_any_trial(tmp_path, mnist_root, slurm, monkeypatch):
    # the test cluster's config with its controller on a port where nothing listens: slurmctld is down
    conf = Path(SLURM_CONF).read_text()
    port = free_port()
    (tmp_path / "slurm.conf").write_text(re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={port}", conf))
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    start = time.perf_counter()
    result = run_cli(sweep_args(tmp_path, mnist_root, *launcher_args(slurm), *SPACE), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: hydra/launcher=slurm: the SLURM controller does not answer (`scontrol ping`: "
                           "Slurmctld(primary) at ") and " is DOWN)" in line, line
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - start < 60  # start-up plus the ping: no sbatch retrying for minutes
    assert not (tmp_path / "optuna.db").exists() or load(tmp_path).trials == []  # no trial claimed
    assert mlflow_runs(tmp_path)[1] == []  # no parent run either


# -- unit tests: no cluster -------------------------------------------------------------------------------------

class FakeJob:
    """What the launcher reads of a submitit job: job_id, state, paths.stderr, results(), cancel()."""

    def __init__(self, results=None, error=None, state="COMPLETED"):
        self.job_id, self.state, self._results, self._error = "12_0", state, results, error
        self.paths = type("Paths", (), {"stderr": Path("/logs/12_0_0_log.err")})()
        self.cancelled = False

    def results(self):
        if self._error is not None:
            raise self._error
        return self._results

    def cancel(self, check=True):
        self.cancelled = True


def job_outcome(job):
    from hydra_plugins.hydra_optuna_pruning_sweeper._outcome import outcome
    from hydra_plugins.hydra_optuna_pruning_sweeper._slurm import job_return

    return outcome(job_return(job, ["x=1"]), 1)


@pytest.mark.parametrize("state", ["CANCELLED by 0", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"])
def test_a_job_that_ended_without_a_result_is_an_interrupted_trial(state):
    from submitit.core.utils import UncompletedJobError

    trial_state, values, reason, stop, interrupted = job_outcome(FakeJob(error=UncompletedJobError("no output"),
                                                                         state=state))
    assert trial_state == TrialState.FAIL and interrupted and stop is None and values is None
    assert reason == f"JobInterrupted: SLURM job 12_0 ended {state} before its trial did"


def test_an_app_stopped_by_submitit_at_its_time_limit_is_an_interrupted_trial():
    # near the time limit submitit's signal handler raises UncompletedJobError inside the app; Hydra's run_job
    # returns it as the job's failure
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    ret = JobReturn(overrides=["x=1"], status=JobStatus.FAILED)
    ret.return_value = UncompletedJobError("Job not requeued because: timed-out too many times.")
    trial_state, _, reason, _, interrupted = job_outcome(FakeJob(results=[ret]))
    assert trial_state == TrialState.FAIL and interrupted
    assert reason.startswith("JobInterrupted: SLURM job 12_0 reached its time limit (submitit: Job not requeued")


def test_a_job_that_failed_or_finished_on_its_own_is_not_an_interruption():
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import FailedJobError

    crashed = job_outcome(FakeJob(error=FailedJobError("Job (task=0) failed during processing with trace:\n...")))
    assert crashed[0] == TrialState.FAIL and not crashed[4]
    assert crashed[2] == "RuntimeError: SLURM job 12_0 failed outside the app; its log: /logs/12_0_0_log.err"
    done = JobReturn(overrides=["x=1"], status=JobStatus.COMPLETED)
    done.return_value = 0.9
    assert job_outcome(FakeJob(results=[done])) == (TrialState.COMPLETE, [0.9], None, None, False)


def test_an_interrupted_launch_cancels_its_jobs(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while the batch runs: the sweeper fails the trials, and their jobs are cancelled (upstream
    leaves them training)."""
    import submitit
    from omegaconf import OmegaConf

    from hydra_plugins.hydra_optuna_pruning_sweeper._slurm import SlurmLauncher

    jobs = [FakeJob(error=KeyboardInterrupt()), FakeJob(error=KeyboardInterrupt())]
    submitted = {}

    class FakeExecutor:
        def __init__(self, **kwargs):
            submitted["init"] = kwargs

        def update_parameters(self, **kwargs):
            submitted["params"] = kwargs

        def map_array(self, fn, *columns):
            submitted["columns"] = columns
            return jobs

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    launcher = SlurmLauncher(submitit_folder=str(tmp_path / "%j"), timeout_min=5, cpus_per_task=2, partition="cpu",
                             max_num_timeout=0, python=None, name="trial")
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([["x=1"], ["x=2"]], initial_job_idx=3)
    assert all(job.cancelled for job in jobs)
    # upstream's settings, passed the way upstream passes them
    assert submitted["init"] == {"folder": str(tmp_path / "%j"), "cluster": "slurm", "slurm_max_num_timeout": 0,
                                 "slurm_python": None}
    assert submitted["params"] == {"timeout_min": 5, "cpus_per_task": 2, "name": "trial", "slurm_partition": "cpu"}
    assert submitted["columns"][0] == [["x=1"], ["x=2"]] and submitted["columns"][2] == [3, 4]


def test_slurm_commands_missing_is_one_error_naming_the_launcher(monkeypatch, tmp_path):
    from mnist_sweep.errors import UserError
    from hydra_plugins.hydra_optuna_pruning_sweeper._slurm import check_cluster

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol there
    with pytest.raises(UserError, match=r"^hydra/launcher=slurm needs SLURM's commands \(scontrol, sbatch, sacct\)"):
        check_cluster()

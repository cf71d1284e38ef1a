"""`hydra/launcher=slurm`: trials as SLURM jobs through Hydra's submitit launcher, for any Hydra app (this module
knows nothing of the app), with each job's own outcome and a check that the cluster answers.

Upstream's launcher returns a batch's results, or raises on the first job that ended without one (cancelled with
scancel, out of its time limit, its node lost, its process killed): the other jobs' results are lost and the sweep
dies with submitit's traceback. Here such a job gives a FAILED JobReturn whose error is JobInterrupted, which the
sweeper handles like a trial stopped by Ctrl-C: FAIL with the reason, the MLflow run KILLED, the parameters queued
to run again once. The jobs themselves run upstream's code (the launcher's __call__ and checkpoint, pickled by
submitit), with upstream's settings (its config classes, its executor name).

Why launch() is overridden rather than configured: upstream's launch submits the array job and collects its
results in one method (`[j.results()[0] for j in jobs]`), with no hook between the two, and the job handles never
leave it; per-job results and cancelling on Ctrl-C both need those handles. What it does before submitting
(the executor's arguments, the sweep folder) is the same as upstream's, in executor_args and job_parameters.

Submitit learns that a job ended without a result from `sacct`, so the cluster needs its accounting (slurmdbd).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

from ._errors import JobInterrupted, UserError
from ._outcome import job_error

PING_TIMEOUT_S = 15  # a controller that does not answer `scontrol ping` in this many seconds counts as down
EXECUTOR_KEYS = ("max_num_timeout", "python")  # settings that submitit takes when the executor is made


class SlurmLauncher(SubmititSlurmLauncher):
    """Upstream's SLURM launcher (same settings, same jobs); launch() returns one JobReturn per job, always, and
    cancels the batch's jobs when the sweep is interrupted (upstream leaves them running)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit  # lazy, as upstream: plugin discovery imports this module

        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **executor_args(self.params, self._EXECUTOR))
        executor.update_parameters(**job_parameters(self.params, self._EXECUTOR))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = [initial_job_idx + i for i in range(len(job_overrides))]
        # one array job; each task calls this launcher's __call__ (upstream's) with these arguments
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(numbers),
                                  numbers, [f"job_id_for_{n}" for n in numbers],
                                  [Singleton.get_state()] * len(numbers))
        try:
            return [job_return(job, list(overrides)) for job, overrides in zip(jobs, job_overrides)]
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the sweeper fails these trials, so their jobs must go too
            for job in jobs:
                job.cancel(check=False)
            raise


def executor_args(params: dict[str, Any], executor: str = "slurm") -> dict[str, Any]:
    """submitit.AutoExecutor's arguments from the launcher's settings: the folder and the slurm_* init keys."""
    return {"folder": params["submitit_folder"]} | {f"{executor}_{k}": params[k] for k in EXECUTOR_KEYS
                                                    if k in params}


def job_parameters(params: dict[str, Any], executor: str = "slurm") -> dict[str, Any]:
    """executor.update_parameters' arguments: the settings every submitit executor knows keep their names
    (timeout_min, cpus_per_task, mem_gb...), SLURM's own get the slurm_ prefix (partition, qos, setup...)."""
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    return {k if k in shared else f"{executor}_{k}": v for k, v in params.items()
            if k not in EXECUTOR_KEYS and k != "submitit_folder"}


def job_return(job: Any, overrides: list[str]) -> JobReturn:
    """A submitit job's JobReturn; a job that ended without a result, or whose app submitit stopped at the time
    limit (its signal handler raises UncompletedJobError inside the app), is a FAILED one with JobInterrupted."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        ret: JobReturn = job.results()[0]
    except FailedJobError:  # the job's process failed outside the app: its traceback (a page) is in its log
        return failed_return(overrides, RuntimeError(
            f"SLURM job {job.job_id} failed outside the app; its log: {job.paths.stderr}"))
    except UncompletedJobError:  # no result file and sacct says the job is over: it was stopped from outside
        return failed_return(overrides, JobInterrupted(f"SLURM job {job.job_id} ended {job.state} before its "
                                                       "trial did"))
    error = job_error(ret)
    if isinstance(error, UncompletedJobError):
        return failed_return(overrides, JobInterrupted(f"SLURM job {job.job_id} reached its time limit "
                                                       f"(submitit: {error})"))
    return ret


def failed_return(overrides: list[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = error
    return ret


def check_cluster(timeout_s: float = PING_TIMEOUT_S) -> None:
    """slurmctld must answer before a sweep claims a trial: else sbatch fails (after retrying for seconds) with
    submitit's traceback, and the claimed trials are left behind."""
    try:
        done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UserError("hydra/launcher=slurm needs SLURM's commands (scontrol, sbatch, sacct) on the PATH of the "
                        "machine that runs the sweep: run it on a submit host of the cluster, or choose another "
                        "hydra/launcher (basic, joblib)") from None
    except subprocess.TimeoutExpired:
        answer = f"no answer in {timeout_s:g} s"
    else:
        if done.returncode == 0 and " is UP" in done.stdout:
            return
        lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip("* \t")]
        answer = lines[0] if lines else f"exit code {done.returncode}"
    raise UserError(f"hydra/launcher=slurm: the SLURM controller does not answer (`scontrol ping`: {answer}); "
                    "nothing was run. Check that slurmctld is up (`sinfo`) and that this machine is a submit host "
                    "of the cluster (SLURM_CONF), or choose another hydra/launcher (basic, joblib)")

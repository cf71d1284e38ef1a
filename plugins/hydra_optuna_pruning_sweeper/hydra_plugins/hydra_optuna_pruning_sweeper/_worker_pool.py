"""The main process's side of local workers (`hydra.sweeper.local_workers: true`): n_jobs copies of this command
run the trials (each one the _worker.py role), and this process only waits for them. It stops them all when one
fails, forwards Ctrl-C and SIGTERM (_local_workers.Workers), and fails (and re-queues once) the trial of one that
is killed, at once, for the others to re-run."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna

from . import _local_workers as local_workers, _study as studies
from ._clock import SweepClock
from ._recovery import Recovery

log = logging.getLogger("optuna_pruning")


def wanted(asked: bool, launcher: Any, n_workers: int) -> bool:
    """Whether this sweep's trials run in local worker processes: asked for, more than one trial to run at once,
    and Hydra's basic launcher (which runs a job in the process that launches it; joblib and SLURM bring
    their own processes, and get batches)."""
    if not asked or n_workers < 2:
        return False
    name = type(launcher).__name__
    if name != "BasicLauncher" or not local_workers.SUPPORTED:
        where = name if local_workers.SUPPORTED else f"{name} on {os.name}"
        log.info(f"hydra.sweeper.local_workers: {where} runs batches of n_jobs trials instead (local workers "
                 "need Hydra's basic launcher on a POSIX system)")
        return False
    return True


def run(study: optuna.Study, recovery: Recovery, n_workers: int, n_trials: int, clock: SweepClock,
        sweep_dir: Path, cwd: str) -> None:
    """Start n_workers workers on the study and wait for them; a WorkerFailed when one failed, or when every
    worker was killed before the budget was spent."""
    command = local_workers.worker_command(sys.orig_argv, sys.executable, sweep_dir.absolute())
    threads = local_workers.thread_env(os.environ, n_workers, os.cpu_count()).get(
        "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))

    def on_death(proc: subprocess.Popen) -> None:
        how = local_workers.signal_name(proc.returncode)
        failed = recovery.dead_worker(f"{socket.gethostname()}:{proc.pid}",
                                      f"its local worker process {proc.pid} was killed ({how})")
        log.warning(f"local worker {proc.pid} was killed ({how}); "
                    + (f"its trial {', '.join(map(str, failed))} is FAIL and queued again for the other workers"
                       if failed else "it held no trial"))

    with local_workers.Workers.start(n_workers, command, cwd, os.environ, study.study_name, n_trials,
                                     os.cpu_count(), on_death) as workers:
        log.info(f"{n_workers} local worker processes (pids {', '.join(map(str, workers.pids))}), "
                 f"{threads} OpenMP thread(s) each; each takes the next trial as soon as its own ends")
        failed = workers.wait()
        lines = workers.failure_lines()
    if failed is None and clock.past():
        log.info("time budget spent (hydra.sweeper.timeout): no new trial started after it, running ones "
                 "stopped at their next epoch")
    if failed is not None:
        raise local_workers.WorkerFailed(failed.returncode, lines[0] if lines else (
            f"local worker {failed.pid} ended with {local_workers.signal_name(failed.returncode)}; the other "
            "workers were stopped (their trials are FAIL and run again on resume)"))
    tally = studies.read_tally(study)
    used = tally.used
    if (used < n_trials and not clock.past()) or tally.running:
        raise local_workers.WorkerFailed(1, f"error: every local worker was killed before the study's budget was "
                                            f"spent ({used}/{n_trials} trials); run the same command again to "
                                            "resume")

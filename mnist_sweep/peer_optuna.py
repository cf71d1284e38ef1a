"""The sweep benchmark's `optuna` peer: ours' sampler and pruner in a bare Optuna loop, no Hydra and no MLflow.

n_jobs worker processes (as many as ours trains at once) share one SQLite study; each runs
`study.optimize(objective, timeout=what is left of the budget)` (with a number of trials: its share of them) and
loads MNIST once (the library caches it per process). Worker i seeds its TPE with seed + i: with one seed, the
workers' random start-up trials would be the same points, trained twice. The pruner is ours (successive halving
at epochs 2, 4 and 8 by default) and, as ours does, never judges a trial's last epoch: the work is done by then,
and a rung at the last epoch would throw a result away.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

from . import shell
from .epoch_log import EPOCH_LOG, TrialRecord
from .errors import StopSweep, one_line
from .peer_plan import PeerPlan, final_test_acc, optuna_pruner, prepare_trial, tpe_sampler
from .sweepbench import METRIC

STUDY = "optuna"  # the study's name in its storage
STORAGE = "optuna.db"  # in the study folder


def trial_shares(n_trials: int, n_jobs: int) -> list[int]:
    """Each worker's number of trials, together exactly n_trials: Optuna's n_trials counts one process's trials."""
    return [n_trials // n_jobs + (i < n_trials % n_jobs) for i in range(n_jobs)]


def run(plan: PeerPlan, folder: Path, deadline: float, n_trials: int | None = None) -> int:
    """The study, until the deadline or n_trials trials (None: no limit); the exit code: 0, else a worker's (2: a
    trial said the whole study would fail, e.g. no MNIST at data.root)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{folder / STORAGE}"
    # created once here: workers creating it at the same moment race for the study's row
    optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as ours' workers are; no forked torch state
    shares = trial_shares(n_trials, plan.n_jobs) if n_trials is not None else [None] * plan.n_jobs
    workers = [spawn.Process(target=work, args=(plan, folder, i, deadline, shares[i]), name=f"optuna-worker-{i}")
               for i in range(plan.n_jobs)]
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to this process alone: else its exit would wait for the workers
        for w in workers:
            w.terminate()
            w.join()
        raise
    return next((w.exitcode for w in workers if w.exitcode), 0)


def work(plan: PeerPlan, folder: Path, index: int, deadline: float, n_trials: int | None = None) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{folder / STORAGE}",
                              sampler=tpe_sampler(plan, plan.seed + index), pruner=optuna_pruner(plan))
    stop: list[BaseException] = []
    # every trial error is the trial's FAIL (a diverged lr), as in ours; a StopSweep also ends the study
    study.optimize(lambda trial: objective(trial, plan, folder / EPOCH_LOG, stop), catch=(Exception,),
                   n_trials=n_trials, timeout=max(0.0, deadline - time.time()))
    if stop:
        print(shell.error_line(stop[0]), file=sys.stderr, flush=True)
        sys.exit(2)


def objective(trial, plan: PeerPlan, log: Path, stop: list[BaseException]) -> float:
    import optuna

    from hydra_plugins.hydra_optuna_pruning_sweeper import suggest
    from .train import fit

    suggest(trial, plan.distributions)
    record = TrialRecord(log, str(trial.number), trial.number)
    record.start(trial.params, plan.epochs)

    def epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        record.epoch(epoch, metrics)
        trial.report(metrics[METRIC], epoch)
        if epoch < plan.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    try:
        prepared = prepare_trial(plan, trial.params)
        history = fit(prepared, epoch_end)
        test_acc = final_test_acc(prepared)
    except optuna.TrialPruned:
        record.end("PRUNED")
        raise
    except Exception as e:
        record.end("FAIL", error=one_line(e))
        if isinstance(e, StopSweep):
            stop.append(e)
            trial.study.stop()
        raise
    value = history[-1][METRIC]
    record.end("COMPLETE", value, test_acc)
    return value

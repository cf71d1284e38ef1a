"""The sweep benchmark's `ray` peer: Ray Tune with OptunaSearch (TPE with ours' seed and n_startup_trials) and the
scheduler nearest ours' pruner (ASHA with ours' rungs by default; peer_plan.ray_scheduler), n_jobs trials at once
on a local Ray of n_jobs CPUs, one CPU each. Needs `pip install -e '.[bench]'`.

A trial is a class Trainable whose step() is one epoch of the library's fit(); actors are reused from trial to
trial (reset_config), so a worker process loads MNIST once, as ours' workers do. Ray tells a trial that ASHA stopped
to Optuna as COMPLETE with its last value; that is Ray's design and is left as it is.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from . import shell
from .epoch_log import EPOCH_LOG, TrialRecord
from .errors import StopSweep, one_line
from .peer_plan import (ASHA, EPOCHS_ATTR, FIFO, MEDIAN_STOPPING, PeerPlan, final_test_acc, prepare_trial,
                        ray_scheduler, tpe_sampler)
from .sweepbench import MANY_TRIALS, METRIC

STOPPED = "stopped.txt"  # in the study folder: why a trial stopped the whole study (a StopSweep: no data, ...)
RESULTS = "tune"  # Tune's folder inside the study folder


class Epochs:
    """fit() in a thread of its own, handing over one epoch per next(): Tune asks for epochs one step() at a time
    while the library's fit owns the loop. Between epochs the thread waits, so stop() returns at once."""

    _GO, _STOP, _DONE = object(), object(), object()

    def __init__(self, prepared) -> None:
        self._prepared = prepared
        self._metrics: queue.Queue = queue.Queue(maxsize=1)
        self._go: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._fit, daemon=True, name="fit")

    def _fit(self) -> None:
        from .train import fit

        try:
            fit(self._prepared, self._hand_over)
            self._metrics.put(self._DONE)
        except BaseException as e:  # to the step() that waits for this epoch
            self._metrics.put(e)

    def _hand_over(self, epoch: int, metrics: dict[str, float]) -> bool:
        self._metrics.put((epoch, metrics))
        return self._go.get() is self._STOP  # True ends fit after this epoch

    def next(self) -> tuple[int, dict[str, float]] | None:
        """The next epoch's (epoch, metrics); None once fit has ended."""
        if self._thread.ident is None:
            self._thread.start()
        else:
            self._go.put(self._GO)
        item = self._metrics.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is self._DONE else item

    def stop(self) -> None:
        if self._thread.is_alive():
            self._go.put(self._STOP)
            self._thread.join()


class EpochTrainable(tune.Trainable):
    """One trial: setup() prepares it as a run of the CLI would, step() trains one epoch, the last one also tests."""

    def setup(self, config: dict, plan: PeerPlan, folder: str) -> None:
        self._plan, self._folder = plan, Path(folder)
        self._open(config)

    def _open(self, config: dict) -> None:
        params = dict(config)
        self._record = TrialRecord(self._folder / EPOCH_LOG, self.trial_id)
        self._record.start(params, self._plan.epochs)
        self._epochs = None
        try:
            self._prepared = prepare_trial(self._plan, params)
        except Exception as e:
            self._fail(e)
        self._epochs = Epochs(self._prepared)

    def _fail(self, e: Exception) -> None:
        self._record.end("FAIL", error=one_line(e))
        if isinstance(e, StopSweep):  # every trial would fail the same way: the Stopper ends the study
            (self._folder / STOPPED).write_text(str(e))
        raise e

    def step(self) -> dict:
        try:
            epoch, metrics = self._epochs.next()
            done = epoch >= self._plan.epochs
            test_acc = final_test_acc(self._prepared) if done else None
        except Exception as e:
            self._fail(e)
        self._record.epoch(epoch, metrics)
        if done:
            self._record.end("COMPLETE", metrics[METRIC], test_acc)
        return {METRIC: metrics[METRIC], "done": done}

    def reset_config(self, new_config: dict) -> bool:
        self.cleanup()
        self._open(new_config)
        return True

    def cleanup(self) -> None:
        if self._epochs is not None:
            self._epochs.stop()


class StopOnStudyError(tune.Stopper):
    def __init__(self, marker: Path) -> None:
        self._marker = marker

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self._marker.exists()


class RecordsPrunes:
    """A scheduler that writes the PRUNED end line of each trial it stops before its last epoch: only the scheduler
    knows that it stopped the trial (the budget ending the study stops trials too; those stay cut off)."""

    def __init__(self, *args, log: Path, epochs: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._log, self._epochs = log, epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(EPOCHS_ATTR, self._epochs) < self._epochs:
            TrialRecord(self._log, trial.trial_id).end("PRUNED")
        return action


SCHEDULERS = {ASHA: type("RecordedASHA", (RecordsPrunes, ASHAScheduler), {}),
              MEDIAN_STOPPING: type("RecordedMedianStopping", (RecordsPrunes, MedianStoppingRule), {}),
              FIFO: FIFOScheduler}


def scheduler(plan: PeerPlan, folder: Path) -> TrialScheduler:
    kind, kwargs = ray_scheduler(plan.pruner, plan.epochs)
    if kind == FIFO:
        return FIFOScheduler()
    return SCHEDULERS[kind](log=folder / EPOCH_LOG, epochs=plan.epochs, **kwargs)


def run(plan: PeerPlan, folder: Path, deadline: float) -> int:
    """The study until the deadline; 0, or 2 when a trial said every trial would fail."""
    start = time.time()
    ray.init(num_cpus=plan.n_jobs, include_dashboard=False, log_to_driver=True, configure_logging=False)
    print(f"ray.init: {time.time() - start:.1f} s", flush=True)  # Ray's own start-up, in the study's log
    try:
        trainable = tune.with_resources(tune.with_parameters(EpochTrainable, plan=plan, folder=str(folder)),
                                        {"cpu": 1})
        search = OptunaSearch(space=plan.distributions, metric=METRIC, mode="max", sampler=tpe_sampler(plan, plan.seed))
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search, scheduler=scheduler(plan, folder), num_samples=MANY_TRIALS,
            max_concurrent_trials=plan.n_jobs, reuse_actors=True, time_budget_s=max(1.0, deadline - time.time())),
            run_config=tune.RunConfig(name=RESULTS, storage_path=str(folder), stop=StopOnStudyError(folder / STOPPED),
                                      # a trial is retrained from scratch or not at all: no checkpoints to save
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False), verbose=1))
        tuner.fit()
    finally:
        ray.shutdown()
    if (folder / STOPPED).exists():
        print(shell.error_line((folder / STOPPED).read_text()), file=sys.stderr, flush=True)
        return 2
    return 0

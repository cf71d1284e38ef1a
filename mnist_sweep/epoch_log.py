"""The peers' record of their trials (`python -m mnist_sweep.peers`): JSON lines in one file of the study folder,
appended by whichever process trains a trial, read back by the sweep benchmark as its Trial and Run.

Neither peer writes to MLflow, and Ray's Optuna study is not ours to read, so this file stands in for ours' two
stores. Per trial: a `start` line (its params), an `epoch` line per epoch, and an `end` line (COMPLETE, PRUNED or
FAIL). A trial without an end line was cut off by the budget and counts as "other", as a RUNNING trial of ours does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from .sweepbench import METRIC, Epoch, Run, Trial

EPOCH_LOG = "epochs.jsonl"  # in the study folder
END_STATES = ("COMPLETE", "PRUNED", "FAIL")
# What each state of a trial is as an MLflow run status (sweepbench.read_runs's vocabulary): a pruned run of ours
# ends FINISHED too; a trial the budget cut off is still RUNNING
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "RUNNING": "RUNNING"}


class TrialRecord:
    """The lines of one trial. Each line is one write() to a file opened for appending, so the lines of trials
    training at once in other processes never interleave."""

    def __init__(self, path: Path, trial: str, number: int | None = None) -> None:
        self.path, self.trial, self.number = Path(path), trial, number

    def _append(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "trial": self.trial, "number": self.number, "time": time.time(), **fields})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def start(self, params: dict[str, Any], epochs: int) -> None:
        self._append("start", params=params, epochs=epochs)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._append("epoch", epoch=epoch, val_acc=metrics[METRIC],
                     model_seconds=metrics.get("epoch_seconds", 0.0) + metrics.get("val_seconds", 0.0))

    def end(self, state: str, value: float | None = None, test_acc: float | None = None,
            error: str | None = None) -> None:
        if state not in END_STATES:
            raise ValueError(f"state {state!r}; allowed: {', '.join(END_STATES)}")
        self._append("end", state=state, value=value, test_acc=test_acc, error=error)


def read_records(path: Path) -> list[dict]:
    """The lines of the file; a line cut off by SIGKILL mid-write is skipped."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "trial" in record and "kind" in record:
            records.append(record)
    return records


def trials_and_runs(records: Iterable[dict], started: float) -> tuple[list[Trial], list[Run]]:
    """The records as sweepbench's Trial and Run, seconds since `started` (the study's process start). A trial's
    run has the trial's id, so matching_run finds it; like read_runs, a trial without an epoch has no run. A
    trial's number is its study's (Optuna's), else its place in the order the trials started (Ray's ids are
    hashes)."""
    by_trial: dict[str, list[dict]] = {}
    for r in records:
        by_trial.setdefault(str(r["trial"]), []).append(r)
    trials, runs = [], []
    for order, (trial_id, lines) in enumerate(by_trial.items()):
        start = next((r for r in lines if r["kind"] == "start"), {})
        end = next((r for r in lines if r["kind"] == "end"), None)
        state = end["state"] if end else "RUNNING"
        epochs = tuple(Epoch(r["epoch"], r["time"] - started, r["val_acc"], r["model_seconds"])
                       for r in sorted((r for r in lines if r["kind"] == "epoch"), key=lambda r: r["epoch"]))
        params = dict(start.get("params", {}))
        value = _final_value(end, epochs) if state == "COMPLETE" else None
        if state == "COMPLETE" and value is None:  # nothing to rank it by: it is no result
            state = "FAIL"
        number = lines[0].get("number")
        trials.append(Trial(order if number is None else int(number), state, value,
                            end["time"] - started if end else None, params, trial_id))
        if epochs:
            run_params = {k: str(v) for k, v in params.items()}
            if start.get("epochs") is not None:
                run_params["trainer.epochs"] = str(start["epochs"])
            runs.append(Run(trial_id, RUN_STATUS[state], run_params, epochs, end.get("test_acc") if end else None))
    return trials, runs


def _final_value(end: dict, epochs: tuple[Epoch, ...]) -> float | None:
    """What the trial's study was told; an end line without it: the last epoch's val/acc, which is what it is."""
    if end.get("value") is not None:
        return end["value"]
    return epochs[-1].val_acc if epochs else None


def read_epoch_log(path: Path, started: float) -> tuple[list[Trial], list[Run]]:
    return trials_and_runs(read_records(path), started)

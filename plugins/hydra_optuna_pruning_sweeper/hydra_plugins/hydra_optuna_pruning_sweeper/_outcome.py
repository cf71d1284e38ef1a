"""What a finished job means for its trial: a named Outcome from Hydra's JobReturn."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, NamedTuple

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from ._errors import JobInterrupted, StopSweep


class Outcome(NamedTuple):
    """How a trial ended, from its job's JobReturn."""

    state: TrialState
    values: list[float] | None  # the objective values of a COMPLETE trial
    reason: str | None  # why it was PRUNED or FAILed, for the trial's user attrs and its trial line
    stop: StopSweep | None = None  # the job raised StopSweep: a config error that every trial would hit, so the
    # sweep stops with this error
    interrupted: bool = False  # stopped from outside (JobInterrupted, from a launcher): its parameters run again


def outcome(ret: JobReturn, n_objectives: int, trial_number: int | None = None) -> Outcome:
    """The Outcome of a finished job."""
    if ret.status == JobStatus.COMPLETED:
        values = objective_values(ret.return_value, n_objectives, trial_number)
        if isinstance(values, str):
            return Outcome(TrialState.FAIL, None, values)
        return Outcome(TrialState.COMPLETE, values, None)
    error = job_error(ret) or RuntimeError("the job failed without an exception")
    if isinstance(error, optuna.TrialPruned):
        return Outcome(TrialState.PRUNED, None, str(error))
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, StopSweep):
        shown = " ".join(o for o in (ret.overrides or []) if not o.startswith(("hydra.", "++hydra.")))
        return Outcome(TrialState.FAIL, None, reason, StopSweep(f"a trial ({shown}) stopped the sweep: {error}"))
    return Outcome(TrialState.FAIL, None, reason, interrupted=isinstance(error, JobInterrupted))


def job_error(ret: JobReturn) -> BaseException | None:
    """The exception of a failed job, None for any other."""
    if ret.status != JobStatus.FAILED:
        return None
    try:  # the public way to get the job's exception re-raises it, after a line on stderr that the trial line says
        with contextlib.redirect_stderr(io.StringIO()):
            ret.return_value
    except Exception as e:
        return e
    return None


def objective_values(returned: Any, n_objectives: int, trial_number: int | None = None) -> list[float] | str:
    """A job's return value as the trial's values, or why it cannot be (the trial then FAILs). As upstream, a
    value is anything float() converts: int, float, numpy scalars, 0-d arrays and tensors, numeric strings."""
    items = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    trial = "" if trial_number is None else f"trial {trial_number}: "
    if len(items) != n_objectives:
        return (f"{trial}the job returned {str(returned)[:200]!r} ({type(returned).__name__}); expected "
                f"{'a number' if n_objectives == 1 else f'a list of {n_objectives} numbers'}")
    values = []
    for item in items:
        try:
            values.append(float(item))
        except (TypeError, ValueError):
            return (f"{trial}the job returned {str(item)[:200]!r} of type {type(item).__name__}, which float() "
                    f"cannot convert; return {'a number' if n_objectives == 1 else f'a list of {n_objectives} numbers'}")
    if not all(math.isfinite(v) for v in values):
        return f"{trial}the job returned {values}, which is not finite"
    return values

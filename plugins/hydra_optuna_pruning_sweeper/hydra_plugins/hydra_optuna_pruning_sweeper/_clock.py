"""The time budget (hydra.sweeper.timeout): how long a study has run over all its invocations, and when this one
must stop starting trials."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ._names import DEADLINE_ENV, TIME_SPENT_ATTR_PREFIX

if TYPE_CHECKING:
    import optuna

def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by the intervals: workers that ran at the same time count their shared time once."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def time_spent(user_attrs: Mapping[str, Any]) -> float:
    """Seconds the study's invocations have run, from their TIME_SPENT_ATTR_PREFIX attrs."""
    return union_seconds([tuple(v) for k, v in user_attrs.items() if k.startswith(TIME_SPENT_ATTR_PREFIX)])


@dataclass(frozen=True)
class SweepClock:
    """One sweeper invocation's share of hydra.sweeper.timeout: when it started, and when it must stop starting
    trials (None: no timeout)."""

    invocation: str  # host:pid:start of the process that records this invocation's time in the study
    started: float  # Unix seconds
    deadline: float | None  # Unix seconds

    @classmethod
    def start(cls, timeout: float | None, spent_before: float, now: float | None = None) -> "SweepClock":
        """What is left of the study's timeout (`spent_before` seconds of it used by earlier invocations)."""
        now = time.time() if now is None else now
        import socket  # here, not at import: every Hydra app imports this module when it scans its plugins

        invocation = f"{socket.gethostname()}:{os.getpid()}:{now:.0f}"
        return cls(invocation, now, None if timeout is None else now + timeout - spent_before)

    def past(self, now: float | None = None) -> bool:
        return past(self.deadline, now)

    def record(self, study: optuna.Study) -> None:
        """Note in the study that this invocation has run until now; called as it goes, so a killed one counts."""
        if self.deadline is not None:
            study.set_user_attr(TIME_SPENT_ATTR_PREFIX + self.invocation, [self.started, time.time()])


def past(deadline: float | None, now: float | None = None) -> bool:
    return deadline is not None and (time.time() if now is None else now) >= deadline


def deadline_from_env(env: Mapping[str, str]) -> float | None:
    return float(env[DEADLINE_ENV]) if env.get(DEADLINE_ENV) else None



"""Whether a trial's early epochs tell how it ends: the figures a pruner's design rests on, from the per-epoch
validation curves of trials that ran to their end (unpruned studies of the sweep benchmark).

- `rank_correlation`: Spearman's rho between val/acc at each epoch and at the last one, over complete trials. A
  rung at an epoch whose rho is low throws away trials on noise.
- `replay`: a pruner judged on such curves: the trials are fed to it one after another in many random orders, as a
  sequential study would see them; how often the best trial survives, and the share of epochs it trains.

Pure functions of lists of numbers (and Optuna's own pruners for `replay`): no files, no torch, no Hydra.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

Curve = Sequence[float]  # val/acc after epoch 1, 2, ..., last


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None with fewer than 3 pairs or a constant side."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else None


def rank_correlation(curves: Sequence[Curve]) -> dict[int, tuple[float | None, int]]:
    """{epoch: (rho of val/acc at that epoch with the final val/acc, trials)} over the curves of full length (the
    longest length among them): a trial cut short has no final value to compare with."""
    if not curves:
        return {}
    length = max(len(c) for c in curves)
    full = [c for c in curves if len(c) == length]
    finals = [c[-1] for c in full]
    return {e: (spearman([c[e - 1] for c in full], finals), len(full)) for e in range(1, length + 1)}


@dataclass(frozen=True)
class Replay:
    kept_best: float  # share of orders in which the trial with the best final value was not pruned
    epochs: float  # mean share of all curves' epochs that the pruner let train
    best_found: float  # mean over orders of the best final value among the trials that completed


def replay(curves: Sequence[Curve], make_pruner: Callable[[], object], orders: int = 200, seed: int = 0,
           direction: str = "maximize") -> Replay:
    """Feed the curves to a fresh Optuna study with `make_pruner()` in `orders` random orders, one trial after
    another (each reports every epoch and stops when the pruner says so; its last epoch is never pruned, as
    `current_trial().report(..., last=True)` does)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    best = max(range(len(curves)), key=lambda i: curves[i][-1])
    total = sum(len(c) for c in curves)
    kept, used, found = 0, 0, []
    for _ in range(orders):
        order = list(range(len(curves)))
        rng.shuffle(order)
        study = optuna.create_study(direction=direction, pruner=make_pruner())
        finals = []
        for i in order:
            trial = study.ask()
            curve = curves[i]
            for step, value in enumerate(curve, start=1):
                trial.report(value, step)
                used += 1
                if step < len(curve) and trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, curve[-1])
                finals.append(curve[-1])
                kept += i == best
        found.append(max(finals))
    return Replay(kept / orders, used / (total * orders), statistics.fmean(found))

"""Whether a trial's early epochs tell how it ends: the figures a pruner's design rests on, from the per-epoch
validation curves of trials that ran to their end (unpruned studies of the sweep benchmark).

- `rank_correlation`: Spearman's rho between val/acc at each epoch and at the last one, over complete trials. A
  rung at an epoch whose rho is low throws away trials on noise.
- `replay`: a pruner judged on such curves: the trials are fed to it one after another in many random orders, as a
  sequential study would see them; how often the best trial survives, and the share of epochs it trains.

Pure functions of lists of numbers (and Optuna's own pruners for `replay`): no torch, no Hydra. The command reads
the curves of sweep-benchmark folders and prints both figures for a list of candidate pruners:

    python -m mnist_sweep.fidelity outputs/sweepbench/upstream-s0 outputs/sweepbench/ours_nopruning-s5 ...
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import shell
from .errors import UserError

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
    epochs: float  # mean share of the curves' epochs that the pruner let train
    best_found: float  # mean over orders of the best final value among the trials that completed


def replay(curves: Sequence[Curve], make_pruner: Callable[[], object], orders: int = 200, seed: int = 0,
           direction: str = "maximize", epoch_budget: int | None = None) -> Replay:
    """Feed the curves to a fresh Optuna study with `make_pruner()` in `orders` random orders, one trial after
    another (each reports every epoch and stops when the pruner says so; its last epoch is never pruned, as
    `current_trial().report(..., last=True)` does).

    With `epoch_budget`, each order draws trials from the curves with replacement until that many epochs are
    trained, as a time budget would: what pruning saves buys more trials. `kept_best` is then the share of
    orders that completed a draw of the best curve, and `epochs` the share of epochs the drawn trials planned."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    best = max(range(len(curves)), key=lambda i: curves[i][-1])
    kept, used, planned, found = 0, 0, 0, []
    for _ in range(orders):
        if epoch_budget is None:
            order = list(range(len(curves)))
            rng.shuffle(order)
        else:
            order = iter(lambda: rng.randrange(len(curves)), None)  # endless draws, cut by the budget
        study = optuna.create_study(direction=direction, pruner=make_pruner())
        finals, kept_this, spent = [-float("inf")], False, 0
        for i in order:
            if epoch_budget is not None and spent >= epoch_budget:
                break
            trial = study.ask()
            curve = curves[i]
            planned += len(curve)
            for step, value in enumerate(curve, start=1):
                trial.report(value, step)
                spent += 1
                if step < len(curve) and trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, curve[-1])
                finals.append(curve[-1])
                kept_this |= i == best
        used += spent
        kept += kept_this
        found.append(max(finals))
    return Replay(kept / orders, used / planned, statistics.fmean(found))


# Pruners to weigh for the default study (9 epochs, one-cycle): Optuna's arguments, as conf/hydra/sweeper/pruner/
CANDIDATES = {
    "successive halving, rungs 1 3 9 (shipped until now)": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1, "reduction_factor": 3},
    "successive halving, rungs 3 9": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 3, "reduction_factor": 3},
    "successive halving, rungs 2 4 8, factor 2": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 2},
    "successive halving, rungs 3 6, factor 2": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 3, "reduction_factor": 2},
    "successive halving, rungs 4 8, factor 2": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 4, "reduction_factor": 2},
    "hyperband 1-9, factor 3": {
        "_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "max_resource": 9, "reduction_factor": 3},
    "median after 4 trials, from epoch 3": {
        "_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 4, "n_warmup_steps": 2},
    "median after 4 trials, from epoch 5": {
        "_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 4, "n_warmup_steps": 4},
    "25th percentile after 4 trials, from epoch 3": {
        "_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0, "n_startup_trials": 4,
        "n_warmup_steps": 2},
    "none": {"_target_": None},
}


def curves_of(folders: Sequence[Path]) -> list[list[float]]:
    """val/acc per epoch of every trial that ended by itself in the benchmark folders' MLflow stores."""
    from .sweepbench import read_runs

    out = []
    for folder in folders:
        for run in read_runs(folder / "mlflow.db", "mnist_sweep", 0.0):
            if run.status == "FINISHED":
                out.append([e.val_acc for e in run.epochs])
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mnist_sweep.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="sweep-benchmark study folders of unpruned studies")
    ap.add_argument("--orders", type=int, default=200, help="random orders each pruner is replayed in")
    ap.add_argument("--epoch-budget", type=int, default=120, help="epochs each replay may train, drawing trials "
                    "with replacement (120: 780 s x 2 workers at ~13 s an epoch); 0: each trial once")
    return ap.parse_args(argv)


@shell.command(stopped="the table is incomplete")
def main(argv: list[str] | None = None) -> int:
    from hydra_plugins.hydra_optuna_pruning_sweeper import build_pruner

    args = parse_args(sys.argv[1:] if argv is None else argv)
    curves = curves_of(args.folders)
    length = max((len(c) for c in curves), default=0)
    full = [c for c in curves if len(c) == length]
    if len(full) < 3:
        raise UserError(f"{len(full)} complete trial(s) in {', '.join(map(str, args.folders))}; need 3 or more")
    rho = rank_correlation(full)
    print(f"{len(full)} complete trials of {length} epochs; final val/acc {min(c[-1] for c in full):.4f}-"
          f"{max(c[-1] for c in full):.4f}")
    print("Spearman rho with the final val/acc: " + ", ".join(f"epoch {e} {r:.2f}" for e, (r, _) in rho.items()
                                                                if r is not None))
    budget = args.epoch_budget or None
    print(f"\nReplayed {args.orders} times" + (f", {budget} epochs each, trials drawn with replacement:"
                                                 if budget else ", each trial once:"))
    print("\n| pruner | best trial completed | epochs trained of planned | best final val/acc found (mean) |\n"
          "|---|---:|---:|---:|")
    for name, spec in CANDIDATES.items():
        r = replay(full, lambda spec=spec: build_pruner(json.dumps(spec)), orders=args.orders,
                   epoch_budget=budget)
        print(f"| {name} | {r.kept_best:.0%} | {r.epochs:.0%} | {r.best_found:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

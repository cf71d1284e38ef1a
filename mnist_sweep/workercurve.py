"""`python -m mnist_sweep.workercurve`: the default study with 1, 2, 4, ... local workers sharing one machine (one
GPU: every worker trains on it), each for the same wall-clock budget: trials per minute and the best val/acc over
time for each worker count, from which a machine's `hydra.sweeper.n_jobs` default is chosen.

Each worker count is one run of the real CLI, `python -m mnist_sweep --multirun hydra.sweeper.n_jobs=N`, in its own
folder DIR/workers-N/ (its own Optuna and MLflow SQLite files), stopped by its own `hydra.sweeper.timeout` (the
budget) and, as a backstop, by SIGTERM a grace period later. The figures come from the study afterwards.

    python -m mnist_sweep.workercurve --workers 1 2 4 8 16 --budget 120 trainer.device=cuda   # on a GPU machine
    python -m mnist_sweep.workercurve --quick model=small data.root=/tmp/x                     # CI smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from . import shell
from .errors import UserError
from .sweepbench import (MARKER, Ran, Trial, best_so_far, child_env, counts, empty_mlflow_store, machine_line,
                         prepare_folder, read_trials, run_until, time_to)

TARGETS = (0.990, 0.992, 0.993)  # val/acc whose wall time to reach is measured
QUICK_BUDGET_S = 60.0  # 2 workers: their start-up (10-40 s on a busy 2-core CPU), then trials of a few seconds
GRACE_S = 60.0  # after the budget, seconds before the backstop SIGTERM (trials stop at their next epoch first)


@dataclass
class Point:
    """One worker count: what its study did within the budget."""

    workers: int
    wall_seconds: float  # the command's whole run: start-up, the budget, the stop of its last trials, the summary
    exit_code: int | None
    trials: dict[str, int]  # complete / pruned / other
    finished_per_minute: float  # complete and pruned trials per minute of the whole run
    final_best: float | None
    to_target: dict[str, float | None]  # seconds to each target, None: not reached
    curve: list[tuple[float, float]]  # (seconds, best val/acc so far)


def point(workers: int, ran: Ran, trials: Sequence[Trial], targets: Sequence[float]) -> Point:
    """A worker count's figures from its trials (seconds since its process started). The whole run is the
    measure, start-up included: more workers start more processes, and that is part of their cost."""
    wall = ran.ended - ran.started
    curve = best_so_far(trials, wall)
    state = counts(trials, wall)
    return Point(workers, wall, ran.exit_code, state, (state["complete"] + state["pruned"]) * 60.0 / wall,
                 curve[-1][1] if curve else None, {f"{t:.3f}": time_to(curve, t) for t in targets}, curve)


def markdown_table(points: Sequence[Point], targets: Sequence[float]) -> str:
    head = ["workers", "trials / min", "complete / pruned / other", "best val/acc %",
            *(f"s to {t:.1%}" for t in targets), "whole run s"]
    lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    for p in points:
        reach = [f"{p.to_target[f'{t:.3f}']:.0f}" if p.to_target[f"{t:.3f}"] is not None else "-" for t in targets]
        lines.append("| " + " | ".join([
            str(p.workers), f"{p.finished_per_minute:.1f}",
            " / ".join(str(p.trials[k]) for k in ("complete", "pruned", "other")),
            f"{p.final_best * 100:.2f}" if p.final_best is not None else "-", *reach, f"{p.wall_seconds:.0f}"]) + " |")
    return "\n".join(lines)


def plot(points: Sequence[Point], budget: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for p in points:
        if p.curve:
            times = [0.0, *(s for s, _ in p.curve), p.wall_seconds]
            values = [float("nan"), *(v * 100 for _, v in p.curve), p.curve[-1][1] * 100]
            ax.step(times, values, where="post", label=f"{p.workers} worker(s)")
    ax.set_xlim(0, max([budget, *(p.wall_seconds for p in points)]))
    ax.set_xlabel("wall-clock seconds since the command started")
    ax.set_ylabel("best val/acc so far (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def command(workers: int, folder: Path, budget: float, user: Sequence[str]) -> list[str]:
    """The default study as shipped, with N workers, the budget as its timeout, and its own stores."""
    return [sys.executable, "-m", "mnist_sweep", "--multirun", f"hydra.sweeper.n_jobs={workers}",
            f"hydra.sweeper.timeout={budget:g}", "hydra.sweeper.n_trials=null", *user,
            f"hydra.sweeper.storage=sqlite:///{folder / 'optuna.db'}", f"hydra.sweeper.study_name=workers-{workers}",
            f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}", "mlflow.registered_model=null",
            f"hydra.sweep.dir={folder / 'sweep'}", f"hydra.sweeper.best_config_dir={folder / 'configs'}"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mnist_sweep.workercurve", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="app overrides for every run, e.g. trainer.device=cuda")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="worker counts to run")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of sweeping per worker count")
    ap.add_argument("--quick", action="store_true", help=f"2 workers for {QUICK_BUDGET_S:.0f} s: a smoke test")
    ap.add_argument("--out", default="outputs/workercurve", help="folder for the studies and the results")
    args = ap.parse_args(argv)
    if args.quick:
        args.workers, args.budget = [2], QUICK_BUDGET_S
    if any(n < 1 for n in args.workers) or len(set(args.workers)) != len(args.workers):
        raise UserError(f"--workers {' '.join(map(str, args.workers))}: each a different count >= 1")
    if not args.budget > 0:
        raise UserError(f"--budget={args.budget:g} must be > 0 (seconds of sweeping per worker count)")
    return args


@shell.command(stopped="the running sweep was stopped; no results written")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).absolute()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out: {out} exists and was not made by workercurve; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m mnist_sweep.workercurve; replaced by its next run\n")
    header = f"{machine_line()}.\nThe default study, {args.budget:g} s of sweeping per worker count."
    print(header, file=sys.stderr, flush=True)
    template = empty_mlflow_store(out / ".empty-mlflow.db")
    points = []
    for n in args.workers:
        folder = out / f"workers-{n}"
        prepare_folder(folder, template)
        ran = run_until(command(n, folder, args.budget, args.overrides), folder, args.budget + GRACE_S, 30.0,
                        child_env())
        trials = read_trials(f"sqlite:///{folder / 'optuna.db'}", f"workers-{n}", ran.started)
        points.append(point(n, ran, trials, TARGETS))
        print(f"workers {n}: exit {ran.exit_code}, {points[-1].trials}, best {points[-1].final_best}",
              file=sys.stderr, flush=True)
    table = markdown_table(points, TARGETS)
    (out / "workercurve.json").write_text(json.dumps({"machine": header, "budget_s": args.budget,
                                                      "points": [asdict(p) for p in points]}, indent=2))
    (out / "workercurve.md").write_text(f"{header}\n\n{table}\n")
    plot(points, args.budget, out / "workercurve.png", header.replace("\n", " "))
    print(f"\n{header}\n\n{table}\n\nwritten: {out / 'workercurve.md'}, {out / 'workercurve.png'}")
    return 1 if any(p.exit_code not in (0, None) for p in points) else 0


if __name__ == "__main__":
    raise SystemExit(main())

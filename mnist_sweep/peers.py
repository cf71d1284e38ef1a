"""`python -m mnist_sweep.peers {optuna,ray} --folder F --seed S --budget B [--trials N] -- OVERRIDES`: one peer
study of the sweep benchmark (mnist_sweep/sweepbench.py starts it and stops it with SIGTERM at the budget; the
equal-trials bench, mnist_sweep/overhead.py, gives the optuna peer a number of trials).

Both search ours' space with ours' sampler and pruner settings, read from the composed config with OVERRIDES, and
train each trial through the library (peer_plan.py); each epoch is a line of F/epochs.jsonl (epoch_log.py):
- optuna: a bare Optuna loop in n_jobs worker processes on one SQLite study (peer_optuna.py);
- ray: Ray Tune's OptunaSearch and ASHA, n_jobs trials at once (peer_ray.py; needs `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import shell
from .errors import UserError
from .sweepbench import OPTIONAL, PEERS


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mnist_sweep.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=PEERS)
    ap.add_argument("--folder", required=True, help="the study's folder: its epoch log, storage and logs")
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    ap.add_argument("--budget", type=float, required=True, help="wall-clock seconds; no trial starts after them")
    ap.add_argument("--trials", type=int, help="optuna only: end after this many trials in all (default: none, "
                    "the budget alone ends it)")
    ap.add_argument("overrides", nargs="*", help="app overrides, as given to the sweep benchmark")
    return ap.parse_intermixed_args(argv)  # the overrides after --, behind the options


@shell.command(stopped="the study was stopped")
def main(argv: list[str] | None = None) -> int:
    started = time.time()  # the budget runs from here: the bench's SIGTERM is what really ends the study
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.budget > 0:
        raise UserError(f"--budget={args.budget:g} must be > 0 (wall-clock seconds)")
    if args.trials is not None and (args.trials < 1 or args.study != "optuna"):
        raise UserError(f"--trials={args.trials}: a number of trials >= 1, for the optuna study only")
    folder = Path(args.folder).absolute()
    if not folder.is_dir():
        raise UserError(f"--folder={folder} is not a folder")
    if args.study == "ray":
        _check_ray()
    from .peer_plan import make_plan

    plan = make_plan(args.overrides, args.seed, os.cpu_count() or 1)
    if args.study == "ray":
        from . import peer_ray

        return peer_ray.run(plan, folder, started + args.budget)
    from . import peer_optuna

    return peer_optuna.run(plan, folder, started + args.budget, args.trials)


def _check_ray() -> None:
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        raise UserError(f"ray: {OPTIONAL['ray'][1]}") from None


if __name__ == "__main__":
    raise SystemExit(main())

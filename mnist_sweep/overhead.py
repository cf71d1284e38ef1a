"""`python -m mnist_sweep.overhead`: what ours costs over a bare Optuna loop at equal trials.

Each study runs exactly --trials trials, and the whole command is timed, from its start to its exit:
- ours: `python -m mnist_sweep --multirun` as shipped (its n_jobs local workers, MLflow, the sweeper's storage and
  claims), with hydra.sweeper.n_trials set and no time budget;
- optuna: the sweep benchmark's bare Optuna loop (mnist_sweep/peer_optuna.py) with ours' sampler, the same n_jobs
  worker processes and threads per trial, no Hydra and no MLflow.
Every trial costs the same: COST_FIXED pins the space's keys that change a trial's work (channels, FC width, batch
size) and no pruner stops a trial early, so both commands train the same epochs of the same net and the difference
is the machinery around them. The lr, weight decay and dropouts are still searched: they change no work. Repeats
alternate the studies (ours, optuna, ours, optuna, ...), so that a slow spell of the machine hits both.

    MNIST_ROOT=/path/to/data python -m mnist_sweep.overhead --trials 8 --repeats 2 [OVERRIDES]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from . import shell
from .errors import UserError

STUDIES = ("ours", "optuna")
REFERENCE = "optuna"  # the ratio's denominator
# one mid-sized net of the default space, so that every trial does the same work
COST_FIXED = ("model.conv1_channels=16", "model.conv2_channels=32", "model.fc_width=128", "data.batch_size=128")
NO_PRUNING = "hydra/sweeper/pruner=none"
CAP_S = 3600.0  # a study still running after this long is stopped and reported as such
GRACE_S = 30.0  # after SIGTERM at the cap, seconds before SIGKILL


@dataclass
class Timed:
    """One study's run: how long the command took and what it trained."""

    study: str
    repeat: int
    command: list[str]
    seconds: float  # the command's start to its exit
    exit_code: int | None
    complete: int  # COMPLETE trials
    trials: int  # every trial it recorded, whatever its state
    epochs: int  # epochs trained by all trials
    model_seconds: float  # training + validation seconds of those epochs


def fixed_overrides(epochs: int, user: Sequence[str]) -> list[str]:
    """What both studies get: no pruner, the pinned net, the epochs, then the user's (which win)."""
    return [NO_PRUNING, *COST_FIXED, f"trainer.epochs={epochs}", *user]


def study_command(study: str, folder: Path, seed: int, n_trials: int, epochs: int, user: Sequence[str]) -> list[str]:
    fixed = fixed_overrides(epochs, user)
    if study == "optuna":
        return [sys.executable, "-m", "mnist_sweep.peers", "optuna", "--folder", str(folder), "--seed", str(seed),
                "--budget", f"{CAP_S:g}", "--trials", str(n_trials), "--", *fixed]
    from .sweepbench import place_overrides

    return [sys.executable, "-m", "mnist_sweep", "--multirun", f"hydra.sweeper.sampler.seed={seed}",
            f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.timeout=null", *fixed,
            *place_overrides(study, folder, folder.name)]


def ratios(timed: Sequence[Timed], study: str, reference: str = REFERENCE) -> list[float]:
    """study's seconds over the reference's, repeat by repeat (each pair ran back to back)."""
    ref = {t.repeat: t.seconds for t in timed if t.study == reference}
    return [t.seconds / ref[t.repeat] for t in timed if t.study == study and t.repeat in ref and ref[t.repeat] > 0]


def spread(values: Sequence[float], fmt: str) -> str:
    """'mean ± std' over repeats; the mean alone for one repeat, whose std says nothing."""
    from .sweepbench import mean_std

    mean, std = mean_std(list(values))
    return f"{mean:{fmt}} ± {std:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def table(timed: Sequence[Timed], n_trials: int) -> str:
    from .sweepbench import mean_std

    head = ["study", "repeats", "wall s", "s per trial", "complete / all trials", "epochs", "model s",
            f"x {REFERENCE}"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for study in dict.fromkeys(t.study for t in timed):
        mine = [t for t in timed if t.study == study]
        wall = mean_std([t.seconds for t in mine])
        ratio = ratios(timed, study)
        lines.append("| " + " | ".join([
            study, str(len(mine)), spread([t.seconds for t in mine], ".1f"), f"{wall[0] / n_trials:.1f}",
            " ".join(f"{t.complete}/{t.trials}" for t in mine), " ".join(str(t.epochs) for t in mine),
            f"{mean_std([t.model_seconds for t in mine])[0]:.0f}",
            spread(ratio, ".3f") if ratio else "-"]) + " |")
    return "\n".join(lines)


def run_study(study: str, repeat: int, out: Path, args: argparse.Namespace, experiment: str, env: dict[str, str],
              template: Path) -> Timed:
    """One study's run in out/<study>-r<repeat>/, read back from its records (ours: its Optuna and MLflow
    stores; optuna: its epoch log)."""
    from .sweepbench import prepare_folder, read_study, run_until

    folder = out / f"{study}-r{repeat}"
    prepare_folder(folder, None if study == "optuna" else template)
    cmd = study_command(study, folder, args.seed, args.trials, args.epochs, args.overrides)
    print(f"{study}, repeat {repeat}: {shlex.join(['python', *cmd[1:]])}", file=sys.stderr, flush=True)
    ran = run_until(cmd, folder, CAP_S, GRACE_S, env)
    trials, runs = read_study(study, folder, folder.name, experiment, ran.started)
    timed = Timed(study, repeat, cmd, ran.ended - ran.started, ran.exit_code,
                  sum(t.state == "COMPLETE" for t in trials), len(trials), sum(len(r.epochs) for r in runs),
                  sum(e.model_seconds for r in runs for e in r.epochs))
    print(f"{study}, repeat {repeat}: {timed.seconds:.1f} s, {timed.complete}/{timed.trials} complete, "
          f"{timed.epochs} epochs, exit code {timed.exit_code}", file=sys.stderr, flush=True)
    return timed


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mnist_sweep.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="app overrides given to both studies, e.g. data.root=/data")
    ap.add_argument("--trials", type=int, default=8, help="trials per study (default 8)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each study, alternating (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    ap.add_argument("--out", default="outputs/overhead", help="folder for the studies and the results")
    args = ap.parse_args(argv)
    for name, least in (("trials", 1), ("epochs", 1), ("repeats", 1)):
        if getattr(args, name) < least:
            raise UserError(f"--{name}={getattr(args, name)} must be >= {least}")
    return args


@shell.command(stopped="the running study was stopped; no results written")
def main(argv: list[str] | None = None) -> int:
    from .config import compose_sweep
    from .sweepbench import child_env, empty_mlflow_store, machine_line, refuse_foreign

    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).absolute()
    for study in STUDIES:  # refuse a foreign folder before any study runs
        for repeat in range(args.repeats):
            refuse_foreign(out / f"{study}-r{repeat}", "a bench")
    header = (f"{machine_line()}.\n{args.trials} trials of {args.epochs} epoch(s) per study, every trial the same "
              f"net ({' '.join(COST_FIXED)}), no pruning, sampler seed {args.seed}.")
    # a bad override ends here, in one line, before any study runs
    experiment = compose_sweep(fixed_overrides(args.epochs, args.overrides)).experiment
    print(header, file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    template = empty_mlflow_store(out / ".empty-mlflow.db")
    env = child_env()
    timed = [run_study(study, repeat, out, args, experiment, env, template)
             for repeat in range(args.repeats) for study in STUDIES]
    text = f"{header}\n\n{table(timed, args.trials)}\n{NOTES}"
    (out / "overhead.json").write_text(json.dumps({"machine": header.splitlines()[0], "trials": args.trials,
                                                   "epochs": args.epochs, "seed": args.seed,
                                                   "overrides": args.overrides,
                                                   "runs": [asdict(t) for t in timed]}, indent=2))
    (out / "overhead.md").write_text(text + "\n")
    print(f"\n{text}\n\nwritten: {out / 'overhead.json'}, {out / 'overhead.md'}")
    short = [t for t in timed if t.complete != args.trials or t.exit_code != 0]
    return 1 if short else 0


NOTES = """
wall s: the command's start to its exit (mean ± std over repeats); s per trial: wall s / trials. model s: training
and validation seconds of all epochs (both workers' together). x optuna: the study's wall s over the bare Optuna
loop's of the same repeat, mean ± std over repeats."""


if __name__ == "__main__":
    raise SystemExit(main())

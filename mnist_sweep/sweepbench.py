"""`python -m mnist_sweep.sweepbench`: our default study against the upstream Optuna sweeper, random search, a bare
Optuna loop and Ray Tune, on the same search space, the same data and the same wall-clock budget per study.

Studies (--studies):
- ours: `python -m mnist_sweep --multirun` as shipped (its n_trials, n_jobs, pruner), only the sampler seed set;
- upstream: hydra-optuna-sweeper's `hydra/sweeper=optuna` with the joblib launcher, as its users run it on this app:
  the default space's params as command-line sweeps, the same number of parallel trials and threads per trial,
  TPE with upstream's defaults, no pruning;
- random: upstream with `hydra/sweeper/sampler=random`;
- ours_nopruning (not run by default): ours with `hydra/sweeper/pruner=none`;
- optuna (not run by default): ours' sampler and pruner settings in a bare Optuna loop, n_jobs worker processes on
  one SQLite study, each trial trained by the library's calls: no Hydra, no MLflow (mnist_sweep/peer_optuna.py);
- ray (not run by default; `pip install -e '.[bench]'`, else skipped): Ray Tune's OptunaSearch (TPE with ours'
  settings) and ASHA with ours' successive-halving rungs, n_jobs trials at once (mnist_sweep/peer_ray.py).
The space is read from the composed config (`hparams_search=default`), so the bench follows whatever it becomes.
The two peers run as `python -m mnist_sweep.peers` and record each epoch in their folder's epochs.jsonl, which
stands in for the Optuna and MLflow stores the other studies are read from (mnist_sweep/epoch_log.py).

Each (study, seed) is one run of the real CLI in its own folder DIR/<study>-s<seed>/ (its own Optuna and MLflow
SQLite files, Hydra's sweep folder and the log), one after another, stopped with SIGTERM at the budget. The
results come from each study's storage and MLflow store afterwards: the best-so-far val/acc over wall-clock
seconds, the test/acc of the best trial, times to targets, trial-epochs, and the share of wall time not spent
training. They go to DIR/sweepbench.json, DIR/sweepbench.md and DIR/sweepbench.png.

    python -m mnist_sweep.sweepbench --budget 900 --sweep-seeds 0 1 2       # the README table
    python -m mnist_sweep.sweepbench --quick model=small data.root=/tmp/x    # CI smoke test on tiny data
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import shell
from .errors import UserError, one_line
from .fidelity import rank_correlation

STUDIES = {
    "ours": "the default study as shipped: python -m mnist_sweep --multirun",
    "upstream": "hydra/sweeper=optuna (TPE, upstream defaults) + joblib, the same space and parallel trials",
    "random": "upstream with hydra/sweeper/sampler=random",
    "ours_nopruning": "ours with hydra/sweeper/pruner=none",
    "optuna": "a bare Optuna loop with ours' sampler and pruner, n_jobs worker processes, no Hydra or MLflow",
    "ray": "Ray Tune: OptunaSearch (TPE as ours) and ASHA (ours' rungs), n_jobs trials at once",
}
PEERS = ("optuna", "ray")  # studies run by `python -m mnist_sweep.peers`, not by the CLI
OPTIONAL = {"ray": ("ray.tune", "ray[tune] is not installed (pip install -e '.[bench]')")}  # study: (module, why)
DEFAULT_STUDIES = ("ours", "upstream", "random")
REFERENCE = "upstream"  # the study whose final best the others race to
TARGETS = (0.990, 0.992, 0.993)  # val/acc whose wall time to reach is measured
METRIC = "val/acc"
MANY_TRIALS = 100_000  # n_trials of the studies that run until the budget stops them
QUICK_BUDGET_S = 25.0  # per study: the processes start (upstream: joblib workers too), then trials of a second or two
GRACE_S = 60.0  # after SIGTERM at the budget, seconds before SIGKILL
MARKER = ".sweepbench"  # in each study folder: the bench made it and may replace it
LOG = "sweep.log"


# -- the commands ------------------------------------------------------------------------------------------------

def override_keys(overrides: Iterable[str]) -> set[str]:
    """'model=small' -> 'model', '+x.y=1' -> 'x.y', 'hydra/sweeper=optuna' -> 'hydra/sweeper'."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def space_overrides(params: dict[str, str], fixed_by_user: set[str]) -> list[str]:
    """The space's params as upstream's command-line sweeps, less the keys the user's overrides fix (a group, or
    the key itself): our sweeper leaves those out of its space the same way, so both search the same space."""
    from hydra_plugins.hydra_optuna_pruning_sweeper import set_by

    return [f"{k}={v}" for k, v in params.items() if not set_by(k, fixed_by_user)]


def trial_threads(user: Sequence[str], n_jobs: int, cores: int) -> list[str]:
    """cores // n_jobs torch threads per trial, as ours' workers get, unless the user set trainer.threads."""
    return [] if "trainer.threads" in override_keys(user) else [f"trainer.threads={max(1, cores // n_jobs)}"]


def study_overrides(study: str, params: dict[str, str], n_jobs: int, max_failure_rate: float, seed: int,
                    cores: int, user: Sequence[str]) -> list[str]:
    """The overrides of one study's `python -m mnist_sweep --multirun`, before the user's and the folder's."""
    if study in ("ours", "ours_nopruning"):
        # ours_nopruning runs until the bench's budget stops it, not the shipped study's own n_trials or timeout
        extra = (["hydra/sweeper/pruner=none", f"hydra.sweeper.n_trials={MANY_TRIALS}", "hydra.sweeper.timeout=null"]
                 if study != "ours" else [])
        return [f"hydra.sweeper.sampler.seed={seed}", *extra]
    threads = trial_threads(user, n_jobs, cores)
    sampler = ["hydra/sweeper/sampler=random"] if study == "random" else []
    # max_failure_rate is ours: upstream's 0.0 ends its whole study at the first diverged trial (an lr at the top
    # of the space can), which would measure that rule rather than the search
    return ["hydra/sweeper=optuna", "hparams_search=none", "hydra/launcher=joblib", *sampler,
            f"hydra.sweeper.n_jobs={n_jobs}", f"hydra.sweeper.n_trials={MANY_TRIALS}",
            "hydra.sweeper.direction=maximize", f"hydra.sweeper.sampler.seed={seed}",
            f"hydra.sweeper.max_failure_rate={max_failure_rate}", *threads,
            *space_overrides(params, override_keys(user))]


def place_overrides(study: str, folder: Path, name: str) -> list[str]:
    """Where one study keeps everything: its own Optuna and MLflow SQLite files and Hydra folders."""
    place = [f"hydra.sweeper.storage=sqlite:///{folder / 'optuna.db'}", f"hydra.sweeper.study_name={name}",
             f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}", "mlflow.registered_model=null",
             f"hydra.sweep.dir={folder / 'sweep'}"]
    if study.startswith("ours"):  # upstream has no best_config_dir; ours would write to ./outputs/configs
        place.append(f"hydra.sweeper.best_config_dir={folder / 'configs'}")
    return place


# -- running a study -------------------------------------------------------------------------------------------------

@dataclass
class Ran:
    started: float  # time.time() just before the process started
    ended: float
    exit_code: int | None
    stopped_at_budget: bool


def run_until(cmd: list[str], folder: Path, budget: float, grace: float, env: dict[str, str]) -> Ran:
    """Run `cmd` in its own process group, its output to folder/LOG; at the budget SIGTERM the whole group (the
    joblib workers too), then SIGKILL after `grace` seconds."""
    with open(folder / LOG, "w") as log:
        started = time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        stopped = False
        try:
            try:
                proc.wait(timeout=max(0.0, started + budget - time.time()))
            except subprocess.TimeoutExpired:
                stopped = True
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            ended = time.time()
        finally:  # Ctrl-C of the bench, or workers the leader left behind (joblib keeps idle ones for minutes)
            _signal_group(proc.pid, signal.SIGTERM if proc.poll() is not None else signal.SIGKILL)
            proc.wait()
    return Ran(started, ended, proc.returncode, stopped)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group has ended


def failed_at_once(ran: Ran, trials: Sequence) -> bool:
    """Ended by itself with an error before making a single trial: a config error, missing data, a broken
    install. (A study that ends with an error after some trials keeps them and is measured.)"""
    return ran.exit_code != 0 and not ran.stopped_at_budget and not trials


def failure_line(log: Path) -> str:
    """What a study that failed at once said: its last `error:` line, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def refuse_foreign(folder: Path, bench: str = "sweepbench") -> None:
    """A study folder a bench may (re)make: none yet, or one an earlier bench made (its MARKER); anything else is
    the user's, and refused."""
    if folder.exists() and not (folder / MARKER).is_file():
        raise UserError(f"--out: {folder} exists and was not made by {bench}; pick another --out")


def prepare_folder(folder: Path, mlflow_template: Path | None) -> None:
    """A fresh folder for one study: a folder of an earlier bench is replaced (ours would resume its study),
    anything else is refused. Its MLflow store starts as a copy of an empty one, as a user's store exists before
    the sweep: creating one takes seconds of schema migrations, which would count against the first study."""
    refuse_foreign(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("made by python -m mnist_sweep.sweepbench; replaced by its next run\n")
    if mlflow_template is not None:  # the peers record no MLflow runs
        shutil.copyfile(mlflow_template, folder / "mlflow.db")


def empty_mlflow_store(path: Path) -> Path:
    """An MLflow SQLite store with MLflow's tables and nothing else, made once per bench."""
    from mlflow.tracking import MlflowClient

    path.unlink(missing_ok=True)
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


# -- what a study recorded -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    number: int
    state: str  # Optuna's TrialState name
    value: float | None
    seconds: float | None  # completion, in seconds since the study's process started
    params: dict = field(default_factory=dict)
    run_id: str | None = None  # ours records each trial's MLflow run


@dataclass(frozen=True)
class Epoch:
    step: int
    seconds: float  # when it was logged, since the study's process started
    val_acc: float
    model_seconds: float  # training (epoch_seconds) + validation (val_seconds)


@dataclass(frozen=True)
class Run:
    run_id: str
    status: str  # FINISHED (complete or pruned), FAILED, KILLED, RUNNING
    params: dict  # MLflow params: the run's resolved config, flattened
    epochs: tuple[Epoch, ...]
    test_acc: float | None


def read_trials(storage_url: str, name: str, started: float) -> list[Trial]:
    """The study's trials, read as the report reads them; none when the study was never created (its process
    failed before)."""
    from hydra_plugins.hydra_optuna_pruning_sweeper import RUN_ID_ATTR

    from .errors import UserError
    from .records import open_existing_study

    try:
        study = open_existing_study(storage_url, name)
    except UserError:
        return []
    return [Trial(t.number, t.state.name, t.value if t.state.name == "COMPLETE" else None,
                  t.datetime_complete.timestamp() - started if t.datetime_complete else None,
                  dict(t.params), t.user_attrs.get(RUN_ID_ATTR))
            for t in study.get_trials(deepcopy=False)]


def read_runs(database: Path, experiment: str, started: float) -> list[Run]:
    """Every run of the study's own MLflow store that logged an epoch (a parent run logs none)."""
    from . import tracking
    from .records import metric_histories

    if not database.is_file():
        return []
    client = tracking.existing_client(f"sqlite:///{database}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = []
    for r in client.search_runs([exp.experiment_id], max_results=50_000):
        history = metric_histories(client, r.info.run_id, (METRIC, "epoch_seconds", "val_seconds"))
        epochs = tuple(Epoch(step, m.timestamp / 1000 - started, m.value,
                             _value(history["epoch_seconds"].get(step)) + _value(history["val_seconds"].get(step)))
                       for step, m in sorted(history[METRIC].items()))
        if epochs:
            runs.append(Run(r.info.run_id, r.info.status, dict(r.data.params), epochs, r.data.metrics.get("test/acc")))
    return runs


def _value(metric) -> float:
    return metric.value if metric is not None else 0.0


# -- the figures: pure functions of trials and runs ------------------------------------------------------------------

def within(seconds: float | None, budget: float) -> bool:
    return seconds is not None and seconds <= budget


def best_so_far(trials: Iterable[Trial], budget: float) -> list[tuple[float, float]]:
    """(seconds, best val/acc so far) at each improvement, from COMPLETE trials completed within the budget."""
    curve: list[tuple[float, float]] = []
    done = sorted((t.seconds, t.value) for t in trials if t.state == "COMPLETE" and within(t.seconds, budget))
    for seconds, value in done:
        if not curve or value > curve[-1][1]:
            curve.append((seconds, value))
    return curve


def time_to(curve: Sequence[tuple[float, float]], target: float | None) -> float | None:
    """Seconds until the best so far first reached `target`; None when it never did."""
    if target is None:
        return None
    return next((seconds for seconds, value in curve if value >= target), None)


def best_trial(trials: Iterable[Trial], budget: float) -> Trial | None:
    """The best COMPLETE trial within the budget; of equals, the first to complete."""
    done = [t for t in trials if t.state == "COMPLETE" and within(t.seconds, budget)]
    return max(sorted(done, key=lambda t: t.seconds), key=lambda t: t.value, default=None)


def matching_run(trial: Trial, runs: Iterable[Run]) -> Run | None:
    """The MLflow run of a trial: ours names it (a trial user attr). Upstream's sweeper knows nothing of MLflow,
    so its trial is found in the study's own store as the run whose params hold the trial's values (a group
    choice, `optimizer=adamw`, is no config value and so no param: skipped) and whose last val/acc is the
    trial's value, which is what the job returned: together they single out one run."""
    runs = list(runs)
    if trial.run_id:
        return next((r for r in runs if r.run_id == trial.run_id), None)
    for run in runs:
        same_params = all(run.params[k] == str(v) for k, v in trial.params.items() if k in run.params)
        if same_params and run.epochs[-1].val_acc == trial.value:
            return run
    return None


def trial_epochs(runs: Iterable[Run], budget: float) -> int:
    """Epochs trained by all trials within the budget: val/acc steps in MLflow, the same count for every study
    (upstream records no intermediate values in Optuna)."""
    return sum(1 for r in runs for e in r.epochs if e.seconds <= budget)


def model_seconds(runs: Iterable[Run], budget: float) -> float:
    """Seconds the trials spent training and validating, epochs within the budget."""
    return sum(e.model_seconds for r in runs for e in r.epochs if e.seconds <= budget)


def not_training_share(model_s: float, wall_s: float, parallel: int) -> float | None:
    """1 - model seconds / (wall seconds x parallel trials): process start-up, data loading, bookkeeping of the
    sweeper and MLflow, testing, and cores left idle."""
    if wall_s <= 0 or parallel < 1:
        return None
    return 1.0 - model_s / (wall_s * parallel)


def unpruned_share(runs: Iterable[Run], budget: float) -> float | None:
    """Epochs the finished trials (complete or pruned) trained, over what they would have trained unpruned
    (each run's trainer.epochs). Runs stopped by the budget are left out: the budget cut them, not the pruner."""
    done = [r for r in runs if r.status == "FINISHED" and r.epochs[-1].seconds <= budget
            and "trainer.epochs" in r.params]
    planned = sum(int(r.params["trainer.epochs"]) for r in done)
    return sum(len(r.epochs) for r in done) / planned if planned else None


def counts(trials: Iterable[Trial], budget: float) -> dict[str, int]:
    """complete / pruned within the budget; other: failed, still running at the budget, or ended after it. A
    WAITING trial never started (ours queues an interrupted trial's params again) and is not counted."""
    out = {"complete": 0, "pruned": 0, "other": 0}
    for t in trials:
        if t.state == "WAITING":
            continue
        key = t.state.lower() if t.state in ("COMPLETE", "PRUNED") and within(t.seconds, budget) else "other"
        out[key] += 1
    return out


@dataclass
class StudyRun:
    """One (study, seed): how it ran and what it reached."""

    study: str
    seed: int
    command: list[str]
    started: str  # ISO time the process started
    wall_seconds: float  # until it ended or the budget, whichever came first
    process_seconds: float  # until the process ended (after the budget: how long it took to stop)
    exit_code: int | None
    stopped_at_budget: bool
    failed: str | None  # why it failed at once, else None
    parallel: int
    curve: list[tuple[float, float]]
    final_best: float | None
    best_test_acc: float | None
    best_trial: int | None
    trials: dict[str, int]
    trial_epochs: int
    model_seconds: float
    not_training: float | None
    unpruned_share: float | None
    # val/acc per epoch of each trial that ended by itself (complete or pruned), for the rank correlation
    val_curves: list[list[float]] = field(default_factory=list)


def analyse(study: str, seed: int, command: list[str], ran: Ran, budget: float, parallel: int,
            trials: list[Trial], runs: list[Run], failed: str | None) -> StudyRun:
    wall = min(ran.ended - ran.started, budget)
    best = best_trial(trials, budget)
    run = matching_run(best, runs) if best else None
    curve = best_so_far(trials, budget)
    model_s = model_seconds(runs, budget)
    return StudyRun(study, seed, command, datetime.datetime.fromtimestamp(ran.started).isoformat(timespec="seconds"),
                    wall, ran.ended - ran.started, ran.exit_code, ran.stopped_at_budget, failed, parallel, curve,
                    curve[-1][1] if curve else None, run.test_acc if run else None, best.number if best else None,
                    counts(trials, budget), trial_epochs(runs, budget), model_s,
                    not_training_share(model_s, wall, parallel), unpruned_share(runs, budget),
                    [[e.val_acc for e in r.epochs] for r in runs if r.status == "FINISHED"
                     and r.epochs[-1].seconds <= budget])


# -- the table and the plot ------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def reach(times: Sequence[float | None]) -> dict | None:
    """Times to a target over seeds: the mean of the seeds that reached it, and how many did; None without
    seeds (no reference to race to)."""
    if not times:
        return None
    hit = [t for t in times if t is not None]
    return {"mean_std": mean_std(hit), "reached": len(hit), "seeds": len(times)}


def summarize(runs: list[StudyRun], targets: Sequence[float], reference: str = REFERENCE) -> list[dict]:
    """One row per study, means over its seeds; 'to reference' races each seed to the reference study's final
    best of the same seed."""
    ref = {r.seed: r.final_best for r in runs if r.study == reference and r.final_best is not None}
    rows = []
    for name in dict.fromkeys(r.study for r in runs):
        mine = [r for r in runs if r.study == name and not r.failed]
        failed = sum(1 for r in runs if r.study == name and r.failed)
        row = {"study": name, "seeds": len(mine), "failed": failed,
               "final_best": mean_std([r.final_best for r in mine]),
               "best_test_acc": mean_std([r.best_test_acc for r in mine]),
               "to_reference": reach([time_to(r.curve, ref[r.seed]) for r in mine if r.seed in ref]),
               "to_target": {f"{t:.3f}": reach([time_to(r.curve, t) for r in mine]) for t in targets},
               "trial_epochs": mean_std([r.trial_epochs for r in mine]),
               "trials": {k: mean_std([r.trials[k] for r in mine]) for k in ("complete", "pruned", "other")},
               "not_training": mean_std([r.not_training for r in mine]),
               "unpruned_share": mean_std([r.unpruned_share for r in mine]),
               "rank_correlation": rank_correlation([c for r in mine for c in r.val_curves])}
        rows.append(row)
    return rows


def rank_table(rows: list[dict]) -> str:
    """Spearman's rho between each epoch's val/acc and the final one, per study, over its trials that ran to
    the end (pooled over seeds): how far a pruner's rung at that epoch can be trusted. A pruned study's complete
    trials are the survivors of its rungs, so its figures are biased; the unpruned studies' are the measure."""
    rows = [r for r in rows if r["rank_correlation"]]
    if not rows:
        return ""
    epochs = max(max(r["rank_correlation"]) for r in rows)
    head = ["study", "complete trials", *(f"epoch {e}" for e in range(1, epochs + 1))]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        rho = r["rank_correlation"]
        n = next(iter(rho.values()))[1]
        cells = [f"{rho[e][0]:.2f}" if e in rho and rho[e][0] is not None else "-" for e in range(1, epochs + 1)]
        lines.append("| " + " | ".join([r["study"], str(n), *cells]) + " |")
    return "\n".join(lines)


def _pm(ms: tuple[float, float] | None, fmt: str, scale: float = 1.0) -> str:
    if ms is None:
        return "-"
    return f"{ms[0] * scale:{fmt}} ± {ms[1] * scale:{fmt}}" if ms[1] else f"{ms[0] * scale:{fmt}}"


def _reach_text(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["reached"]:
        return "not reached"
    text = _pm(r["mean_std"], ".0f")
    return text if r["reached"] == r["seeds"] else f"{text} ({r['reached']}/{r['seeds']})"


def markdown_table(rows: list[dict], targets: Sequence[float], reference: str = REFERENCE) -> str:
    head = ["study", "seeds", "best val/acc %", "test/acc % of best", f"s to {reference}'s best",
            *(f"s to {t:.1%}" for t in targets), "trial-epochs", "complete / pruned / other", "not training",
            "epochs of unpruned"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:" + "|---:" * (len(head) - 2) + "|"]
    for r in rows:
        seeds = str(r["seeds"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
        trials = " / ".join(f"{r['trials'][k][0]:.1f}".removesuffix(".0") if r["trials"][k] else "-"
                            for k in ("complete", "pruned", "other"))
        lines.append("| " + " | ".join([
            r["study"], seeds, _pm(r["final_best"], ".2f", 100), _pm(r["best_test_acc"], ".2f", 100),
            _reach_text(r["to_reference"]), *(_reach_text(r["to_target"][f"{t:.3f}"]) for t in targets),
            _pm(r["trial_epochs"], ".0f"), trials, _pm(r["not_training"], ".1%"),
            _pm(r["unpruned_share"], ".0%") if r["study"].startswith("ours") else "-",
        ]) + " |")
    return "\n".join(lines)


def seed_band(curves: Sequence[Sequence[tuple[float, float]]], budget: float):
    """Step curves of several seeds on their common change points: (times, mean, low, high). The mean is drawn
    where every seed has a value; the band (min-max) where any has."""
    import math

    times = sorted({0.0, budget, *(s for c in curves for s, _ in c if s <= budget)})
    mean, low, high = [], [], []
    for t in times:
        values = [next((v for s, v in reversed(c) if s <= t), None) for c in curves]
        known = [v for v in values if v is not None]
        mean.append(statistics.fmean(known) if known and len(known) == len(values) else math.nan)
        low.append(min(known) if known else math.nan)
        high.append(max(known) if known else math.nan)
    return times, mean, low, high


COLORS = {"ours": "tab:blue", "upstream": "tab:orange", "random": "tab:green", "ours_nopruning": "tab:purple",
          "optuna": "tab:red", "ray": "tab:brown"}


def plot(runs: list[StudyRun], budget: float, targets: Sequence[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    lows = []
    for name in dict.fromkeys(r.study for r in runs):
        mine = [r for r in runs if r.study == name and not r.failed]
        if not any(r.curve for r in mine):
            continue
        times, mean, low, high = seed_band([r.curve for r in mine], budget)
        color = COLORS.get(name)
        ax.fill_between(times, [v * 100 for v in low], [v * 100 for v in high], step="post", color=color,
                        alpha=0.2, linewidth=0)
        label = f"{name} ({len(mine)} seed{'s' if len(mine) > 1 else ''})"
        ax.step(times, [v * 100 for v in mean], where="post", color=color, linewidth=2, label=label)
        lows += [r.final_best for r in mine if r.final_best is not None]
    for t in targets:
        ax.axhline(t * 100, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{t:.1%}", (budget, t * 100), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8, color="grey", annotation_clip=False)
    bottom = min([0.98, *(v - 0.002 for v in lows)])  # below 98% the curves are not the interesting part
    top = min(1.0005, max([max(targets), *lows]) + 0.001)  # a line at 100% stays visible
    ax.set_ylim(bottom * 100, top * 100)
    ax.set_xlim(0, budget)
    ax.set_xlabel("wall-clock seconds since the study started")
    ax.set_ylabel("best val/acc so far (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", title="mean over seeds, band: min-max")
    else:
        ax.text(0.5, 0.5, "no trial completed within the budget", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mnist_sweep.sweepbench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="app overrides given to every study (fixed values, e.g. "
                    "data.root=/data); a key of the search space given here is left out of every study's space")
    ap.add_argument("--budget", type=float, default=900.0, help="wall-clock seconds per study (default 900)")
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds: one run of "
                    "each study per seed (default 0 1 2)")
    ap.add_argument("--studies", nargs="+", default=list(DEFAULT_STUDIES),
                    help=f"which studies, of {', '.join(STUDIES)} (default: {' '.join(DEFAULT_STUDIES)})")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="val/acc levels whose wall "
                    "time to reach is measured (default 0.99 0.992 0.993)")
    ap.add_argument("--grace", type=float, default=GRACE_S, help="seconds after SIGTERM before SIGKILL")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_BUDGET_S:.0f} s per study and the first seed only "
                    "(instead of --budget and --sweep-seeds): a smoke test on tiny data")
    ap.add_argument("--out", default="outputs/sweepbench", help="folder for the studies and the results")
    ap.add_argument("--keep", action="store_true", help="re-read the (study, seed) runs that --out already holds "
                    "from an earlier bench with the same budget instead of running them again: seeds can be added "
                    "one session at a time")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    # `--studies optuna ray model=small`: --studies takes every word after it, and a study's name has no '='
    args.overrides = [*args.overrides, *(w for w in args.studies if "=" in w)]
    studies = [s for s in (n.strip() for n in ",".join(w for w in args.studies if "=" not in w).split(",")) if s]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise UserError(f"--studies {' '.join(args.studies)}: unknown {', '.join(unknown) or 'empty list'}; "
                        f"allowed: {', '.join(STUDIES)}")
    args.studies = list(dict.fromkeys(studies))
    if not args.budget >= 1:
        raise UserError(f"--budget={args.budget:g} must be >= 1 (wall-clock seconds per study)")
    if not args.grace >= 0:
        raise UserError(f"--grace={args.grace:g} must be >= 0 (seconds between SIGTERM and SIGKILL)")
    bad = [t for t in args.targets if not 0 < t <= 1]
    if bad:
        raise UserError(f"--targets {' '.join(map(str, bad))}: a target is a val/acc in (0, 1], e.g. 0.99")
    if len(set(args.sweep_seeds)) != len(args.sweep_seeds):
        raise UserError(f"--sweep-seeds {' '.join(map(str, args.sweep_seeds))}: each seed once")


def runnable(studies: list[str]) -> list[str]:
    """The studies less those whose optional package is not installed, each skipped with one line."""
    import importlib.util

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    missing = {s: OPTIONAL[s][1] for s in studies if s in OPTIONAL and not installed(OPTIONAL[s][0])}
    if missing and len(missing) == len(studies):
        raise UserError(f"--studies {' '.join(studies)}: {'; '.join(f'{s}: {why}' for s, why in missing.items())}")
    for study, why in missing.items():
        print(f"{study}: skipped: {why}", file=sys.stderr, flush=True)
    return [s for s in studies if s not in missing]


def machine_line() -> str:
    from .machine import summary

    m = summary()
    return (f"{m['cpu']}, {m['logical_cores']} logical cores, CPU flags: {m['cpu_flags'] or 'none listed'}; "
            f"torch {m['torch']}, Python {m['python']}")


def child_env() -> dict[str, str]:
    """The studies run this checkout's code and its sweeper plugin (not another installed copy) and log line by
    line."""
    from .config import SOURCE

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if SOURCE:
        plugin = SOURCE / "plugins" / "hydra_optuna_pruning_sweeper"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE), str(plugin), env.get("PYTHONPATH")]))
    return env


@shell.command(stopped="the running study was stopped; no results written")
def main(argv: list[str] | None = None) -> int:
    from .config import compose_sweep

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.budget, args.sweep_seeds, args.grace = QUICK_BUDGET_S, args.sweep_seeds[:1], min(args.grace, 15.0)
    check_args(args)
    args.studies = runnable(args.studies)
    space = compose_sweep(args.overrides)
    if space.optimized_metric != (METRIC,):
        raise UserError(f"optimized_metric={','.join(space.optimized_metric)}: the sweep benchmark compares "
                        f"{METRIC}; leave optimized_metric at {METRIC}")
    out = Path(args.out).absolute()
    folders = {(s, seed): out / f"{s}-s{seed}" for s in args.studies for seed in args.sweep_seeds}
    for folder in folders.values():  # refuse a foreign folder before any study runs
        refuse_foreign(folder)
    cores = os.cpu_count() or 1
    header = (f"{machine_line()}.\nBudget {args.budget:g} s per study, sampler seeds "
              f"{' '.join(map(str, args.sweep_seeds))}, {space.n_jobs} parallel trial(s) "
              f"(upstream, random and the peers: {max(1, cores // space.n_jobs)} thread(s) each).")
    print(header, file=sys.stderr, flush=True)
    env = child_env()
    out.mkdir(parents=True, exist_ok=True)
    template = empty_mlflow_store(out / ".empty-mlflow.db")
    runs: list[StudyRun] = []
    # Ctrl-C or `kill` of the bench (the shell raises SIGTERM as Terminated) stops the running study's process
    # group too: run_until's finally
    for seed in args.sweep_seeds:
        for study in args.studies:
            runs.append(run_one(study, seed, folders[study, seed], space, cores, args, env, template))
    rows = summarize(runs, args.targets)
    table = markdown_table(rows, args.targets)
    ranked = rank_table(rows)
    if ranked:
        table += ("\n\nRank correlation (Spearman) of each epoch's val/acc with the trial's final val/acc, trials "
                  f"that ran to the end:\n\n{ranked}")
    results = {"machine": header.splitlines()[0], "budget_s": args.budget, "seeds": args.sweep_seeds,
               "targets": args.targets, "quick": args.quick, "overrides": args.overrides,
               "space": asdict(space), "cores": cores, "summary": rows, "runs": [asdict(r) for r in runs]}
    (out / "sweepbench.json").write_text(json.dumps(results, indent=2))
    (out / "sweepbench.md").write_text(f"{header}\n\n{table}\n{NOTES}\n")
    plot(runs, args.budget, args.targets, out / "sweepbench.png",
         f"best val/acc so far, {args.budget:g} s per study\n{header.splitlines()[0]}")
    print(f"\n{header}\n\n{table}\n{NOTES}")
    print(f"\nwritten: {out / 'sweepbench.json'}, {out / 'sweepbench.md'}, {out / 'sweepbench.png'}")
    return 1 if any(r.failed for r in runs) else 0


NOTES = """
val/acc of COMPLETE trials completed within the budget; times in seconds since the study's process started
(mean ± std over seeds; "(k/n)": only k of n seeds got there, the mean is theirs). "upstream's best": that seed's
final best of the upstream study. trial-epochs: epochs trained by all trials (MLflow's val/acc steps). not
training: 1 - (training + validation seconds of every epoch) / (wall seconds x parallel trials). epochs of
unpruned: ours' finished trials' epochs over their trainer.epochs."""


RAN = "ran.json"  # in each study folder, once its process ended: how it ran (for --keep)


def kept_run(folder: Path, budget: float, cmd: list[str]) -> Ran | None:
    """How an earlier bench ran this (study, seed), when it ran the same command under the same budget; else None
    (it runs again)."""
    try:
        saved = json.loads((folder / RAN).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("budget") != budget or saved.get("command") != cmd[1:]:
        return None
    return Ran(**saved["ran"])


def study_command(study: str, seed: int, folder: Path, space, cores: int, args: argparse.Namespace) -> list[str]:
    if study in PEERS:
        return [sys.executable, "-m", "mnist_sweep.peers", study, "--folder", str(folder), "--seed", str(seed),
                "--budget", f"{args.budget:g}", "--", *args.overrides]
    overrides = [*study_overrides(study, space.params, space.n_jobs, space.max_failure_rate, seed, cores,
                                  args.overrides), *args.overrides, *place_overrides(study, folder, f"{study}-s{seed}")]
    return [sys.executable, "-m", "mnist_sweep", "--multirun", *overrides]


def read_study(study: str, folder: Path, name: str, experiment: str, started: float) -> tuple[list[Trial], list[Run]]:
    """A CLI study's trials from its Optuna storage and its epochs from its MLflow store; a peer's from its epoch
    log, which stands in for both."""
    if study in PEERS:
        from .epoch_log import EPOCH_LOG, read_epoch_log

        return read_epoch_log(folder / EPOCH_LOG, started)
    return (read_trials(f"sqlite:///{folder / 'optuna.db'}", name, started),
            read_runs(folder / "mlflow.db", experiment, started))


def run_one(study: str, seed: int, folder: Path, space, cores: int, args: argparse.Namespace,
            env: dict[str, str], mlflow_template: Path) -> StudyRun:
    name = f"{study}-s{seed}"
    cmd = study_command(study, seed, folder, space, cores, args)
    ran = kept_run(folder, args.budget, cmd) if args.keep else None
    if ran is not None:
        print(f"{name}: kept from {datetime.datetime.fromtimestamp(ran.started).isoformat(timespec='seconds')}",
              file=sys.stderr, flush=True)
    else:
        prepare_folder(folder, None if study in PEERS else mlflow_template)
        print(f"{name}: {shlex.join(['python', *cmd[1:]])}", file=sys.stderr, flush=True)
        ran = run_until(cmd, folder, args.budget, args.grace, env)
        (folder / RAN).write_text(json.dumps({"budget": args.budget, "command": cmd[1:], "ran": asdict(ran)}))
    try:
        trials, runs = read_study(study, folder, name, space.experiment, ran.started)
    except Exception as e:  # a store cut off by SIGKILL mid-write: the study counts as having recorded nothing
        print(f"warning: {name}: its records could not be read ({one_line(e)}); counted as empty",
              file=sys.stderr, flush=True)
        trials, runs = [], []
    failed = f"exit code {ran.exit_code}: {failure_line(folder / LOG)}" if failed_at_once(ran, trials) else None
    if failed:
        print(f"error: study {study} (seed {seed}) failed at once, {failed}; its log: {folder / LOG}",
              file=sys.stderr, flush=True)
    result = analyse(study, seed, cmd, ran, args.budget, space.n_jobs, trials, runs, failed)
    if not failed:
        print(f"{name}: {result.wall_seconds:.0f} s, trials {result.trials}, best {METRIC} "
              f"{result.final_best if result.final_best is not None else '-'}"
              + ("" if ran.exit_code in (0, None) or ran.stopped_at_budget else f" (exit code {ran.exit_code})"),
              file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""The sweep machinery at scale, not training: N worker processes on ONE study, each the same command
(`python app.py --multirun hydra/sweeper=optuna_pruning ... total_budget=true n_trials=<budget> n_jobs=1`, the
README's *Workers*), so together they run exactly the budget. The app is a tiny foreign Hydra app written into a
temp folder: its objective reports `--steps` steps through `current_trial().report(value, step, last=...)` and
sleeps so that each trial's own work takes `--trial-seconds`. Whatever a trial takes beyond that is the plugin's.

    python plugins/hydra_optuna_pruning_sweeper/benchmarks/scale.py --backend postgres [--workers 1 4 16 64]
    python plugins/hydra_optuna_pruning_sweeper/benchmarks/scale.py --backend sqlite [--workers 1 2 4 8 16]
    python plugins/hydra_optuna_pruning_sweeper/benchmarks/scale.py --quick   # CI: SQLite, N=1,2, 20 short trials
    python plugins/hydra_optuna_pruning_sweeper/benchmarks/scale.py --backend postgres --workers 64 --faults
        # 20 SIGKILLs (each worker replaced), 2 restarts of PostgreSQL and a 30 s outage during the run
        [--trials 1000] [--trial-seconds 2] [--steps 4] [--sampler tpe] [--heartbeat 10] [--out outputs/scale]

Backends: `postgres` starts a throwaway PostgreSQL with the repository's `.ci/postgres.sh` (max_connections=300)
and makes a database per N; `sqlite` puts each N's study in one SQLite file, whose claim lock is a file lock.

For each N, from the study itself (optuna.load_study, after every worker has exited), and from a poller in this
process (every 0.2 s):

- trials/s: COMPLETE trials / (last trial's datetime_complete - first trial's datetime_start); worker start-up
  before the first claim is outside that window, but workers that start late (64 interpreters on 2 cores) are in
  it: `ramp-up` is the spread of the workers' first claims. Speed-up: trials/s over N=1's; efficiency: speed-up/N.
- claim gap p50/p99 (ms): per worker (the trial's `worker` user attr, host:pid), the time from one trial's
  datetime_complete to that worker's next trial's datetime_start. Optuna stamps datetime_complete in
  `study.tell` and datetime_start when `study.ask()` creates the trial, so the gap is: the worker's bookkeeping
  after tell (its trial line, the failure-rate count), waiting for the claim lock, and the work under it before
  the trial is created (stale-trial check, sampler rebuild, budget count). It leaves out what follows the
  creation (the sampler's proposal, user attrs, the first heartbeat, the lock's release, Hydra composing the
  job): that is in the next figure.
- in-trial overhead p50/p99 (ms): a COMPLETE trial's datetime_complete - datetime_start - --trial-seconds: the
  proposal and the rest of the claim after ask, Hydra's launch of the job (config, job folder), the job's
  reports (a database round trip and a pruner question each), and tell. The app records when its job began and
  ended (user attr `bench_job`), so the JSON also splits it into before / in / after the job.
- study read cold / warm ms: `study.get_trials()` of the finished study from this process, its first read and
  the median of 3 more: the claim (_study.claim_trials, under the lock) and each trial's end line and failure
  count read the whole study, so this cost grows with the study and repeats several times per trial; Optuna keeps
  finished trials in a per-process cache, so a worker pays the cold read once and the warm one after.
- peak DB connections: PostgreSQL, `select count(*) from pg_stat_activity where datname = <N's database>` on one
  connection of this process (to the `postgres` database, so not counted); SQLite: n/a.
- RSS: each worker's peak VmRSS (/proc/<pid>/status; the job runs inside the worker with Hydra's basic launcher),
  the max and median over workers, and the peak of the workers' sum at one poll.
- CPU busy: the whole machine's busy share (/proc/stat, other jobs included) over the N's run: on a small
  machine the cores saturate first.
- worker CPU s/trial: the workers' own CPU (user + system, getrusage of the reaped workers, their start-up
  included) per COMPLETE trial: nproc over it is about the most trials/s the cores allow, lock or no lock.
- exactness: COMPLETE == budget, no trial number twice, nothing RUNNING at the end, and the FAIL count. A
  violation is printed loudly and the exit code is 1; that is the only failure: a slow figure never fails.

Prints a markdown table, the CPU (lscpu model, avx*/fma flags, nproc, memory) and, where the figures show one,
the first bottleneck: the first N whose speed-up is below 70% of linear, with each worker's per-trial cycle
(N / trials/s) split against N=1's into claim gap, in-trial overhead and ramp-up, and the part that explains at
least half of the loss named (none named otherwise). Writes scale-<backend>.json (after each N, so a stopped
run keeps what it measured), scale-<backend>.md and scale-<backend>.png (matplotlib, if installed) under --out,
and each worker's output to --out/logs/<backend>-n<N>/worker-<i>.log. An N still running after --timeout has its
workers stopped (its budget then shows short). Ctrl-C or any error kills every worker's process group and stops
PostgreSQL. Imports nothing of mnist_sweep; uses only public APIs of Optuna, Hydra, SQLAlchemy and psycopg.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

from startup import cpu_flags  # the sibling bench's (this folder is on sys.path when a bench runs)

PLUGIN = Path(__file__).resolve().parents[1]  # plugins/hydra_optuna_pruning_sweeper
POSTGRES_SH = PLUGIN.parents[1] / ".ci" / "postgres.sh"  # the repository's throwaway PostgreSQL (as CI uses)
POLL_S = 0.2  # seconds between looks at the workers' RSS and the database's connections
KILL_GRACE_S = 5.0  # seconds a worker gets after SIGTERM (it fails its running trial) before SIGKILL
STUDY = "scale"  # the study's name in each N's own database or file
LOW_EFFICIENCY = 0.7  # a speed-up below this share of linear (N x N=1's rate) is where a bottleneck is named
ATTRIBUTED = 0.5  # a cause is named when it explains at least this share of the per-trial loss
START_S = 300  # seconds allowed for N workers' start-up and end in the default time limit (64 on 2 cores: ~1 min)
MIN_TRIAL_PACE_S = 0.5  # seconds per trial at least, in the default time limit (2 cores ran ~3 trials/s at most)
READS = 4  # full reads of the finished study timed from the bench process: the first cold, the rest warm

APP = '''
import time

import hydra
from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial


@hydra.main(config_path=".", config_name="config")
def objective(cfg):
    began = time.time()
    trial = current_trial()
    value = (cfg.x - 1) ** 2 + cfg.y ** 2
    for step in range(1, cfg.steps + 1):  # a learning curve that ends at `value`
        time.sleep(cfg.seconds / cfg.steps)  # the "training": a fixed time per trial, no CPU
        trial.report(value + 1.0 / step, step, last=step == cfg.steps)
    trial.set_user_attr("bench_job", [began, time.time()])  # lets the bench split the overhead around the job
    return value


if __name__ == "__main__":
    objective()
'''

LIVE: list[subprocess.Popen] = []  # every worker started and not yet reaped: killed on any way out


# -- the machine ---------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:  # no lscpu: the kernel's word for it
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"




def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return None


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "flags": cpu_flags(), "nproc": cores, "memory_gib": memory_gib(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot; None without /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's reaped children: around one N, its workers' own CPU (the jobs
    run inside them), start-up and end included; not the database server's."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])  # kB
    except (OSError, ValueError):
        pass
    return None  # gone, a zombie, or no /proc


# -- backends ------------------------------------------------------------------------------------------------------

class SQLite:
    name = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def new_study_url(self, n: int) -> tuple[str, str | None]:
        """A storage URL of its own for this N (a fresh file); no database name to count connections of."""
        return f"sqlite:///{self.folder / f'n{n}.db'}", None

    def connections(self, database: str | None) -> int | None:
        return None

    def stop(self) -> None:
        pass


class Postgres:
    """A throwaway PostgreSQL (.ci/postgres.sh) and a poller's connection to it; a database per N."""

    name = "postgres"

    def __init__(self) -> None:
        import psycopg  # only this backend needs it (the plugin's `postgres` extra)

        # postgres.sh chowns the folder to the postgres user, which must reach it: a folder of its own in /tmp
        self.folder = Path(tempfile.mkdtemp(prefix="scale-bench-pg-"))
        self.started = False
        try:
            self.dsn = subprocess.run(["bash", str(POSTGRES_SH), "start", str(self.folder)], capture_output=True,
                                      text=True, check=True).stdout.strip()
        except subprocess.CalledProcessError as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise SystemExit(f"PostgreSQL did not start: {e.stderr.strip()}") from None
        self.started = True
        self.conn = psycopg.connect(f"{self.dsn}/postgres", autocommit=True)
        self.lock = threading.Lock()  # the poller thread and the main thread share the one connection

    def new_study_url(self, n: int) -> tuple[str, str]:
        database = f"scale_n{n}_{uuid.uuid4().hex[:8]}"
        with self.lock:
            self.conn.execute(f'CREATE DATABASE "{database}"')
        # the driver named, so SQLAlchemy 2.0 (whose default is psycopg2) and 2.1 both use psycopg 3
        return self.dsn.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{database}", database

    def connections(self, database: str | None) -> int | None:
        import psycopg

        with self.lock:
            try:
                row = self.conn.execute("select count(*) from pg_stat_activity where datname = %s",
                                        (database,)).fetchone()
            except psycopg.Error:  # a restart (--faults) ended this connection: the next poll makes another
                self.conn = psycopg.connect(f"{self.dsn}/postgres", autocommit=True, connect_timeout=2)
                return None
        return int(row[0])

    def completed(self, database: str) -> int | None:
        """COMPLETE trials in an N's database (Optuna's `trials` table); None while it does not answer."""
        import psycopg

        try:
            with psycopg.connect(f"{self.dsn}/{database}", connect_timeout=2) as conn:
                return int(conn.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0])
        except psycopg.Error:
            return None

    def act(self, action: str) -> None:
        """.ci/postgres.sh restart | down | up (--faults)."""
        subprocess.run(["bash", str(POSTGRES_SH), action, str(self.folder)], check=True, capture_output=True)

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self.conn.close()
        finally:
            subprocess.run(["bash", str(POSTGRES_SH), "stop", str(self.folder)], capture_output=True)
            self.started = False
            shutil.rmtree(self.folder, ignore_errors=True)


def postgres_available() -> bool:
    return POSTGRES_SH.exists() and any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


# -- one N ---------------------------------------------------------------------------------------------------------

class Poller(threading.Thread):
    """Peaks of the workers' RSS and the database's connections, every POLL_S, until stopped."""

    def __init__(self, pids: list[int], backend, database: str | None) -> None:
        super().__init__(name="scale-poller", daemon=True)
        self.pids, self.backend, self.database = pids, backend, database
        self.peak_rss = {pid: 0 for pid in pids}  # kB
        self.peak_total_rss = 0  # kB, the workers' sum at one poll
        self.peak_connections: int | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            total = 0
            for pid in self.pids:
                kib = rss_kib(pid)
                if kib:
                    self.peak_rss[pid] = max(self.peak_rss[pid], kib)
                    total += kib
            self.peak_total_rss = max(self.peak_total_rss, total)
            try:
                count = self.backend.connections(self.database)
            except Exception:  # a hiccup of the poll must not end the run: the next poll counts again
                count = None
            if count is not None:
                self.peak_connections = max(self.peak_connections or 0, count)
            self.halt.wait(POLL_S)

    def stop(self) -> None:
        self.halt.set()
        self.join()


class Faults(threading.Thread):
    """--faults, during one N's run on PostgreSQL: a random worker SIGKILLed every `kill_every` seconds (a new one
    started in its place) until `kills`; PostgreSQL restarted (pg_ctl restart -m fast) at 25% and 55% of the budget
    COMPLETE, and stopped for `outage` seconds at 75%. Records when each fault happened."""

    def __init__(self, backend, database: str, budget: int, start_worker, kills: int, kill_every: float,
                 outage: float) -> None:
        super().__init__(name="scale-faults", daemon=True)
        self.backend, self.database, self.budget, self.start_worker = backend, database, budget, start_worker
        self.kills, self.kill_every, self.outage = kills, kill_every, outage
        self.log: list[tuple[float, str]] = []
        self.killed: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        import random

        rng = random.Random(0)
        db_faults = [(0.25, "restart"), (0.55, "restart"), (0.75, "outage")]
        next_kill = time.monotonic() + self.kill_every
        started = time.monotonic()
        while not self.halt.wait(0.5):
            done = self.backend.completed(self.database) or 0
            if db_faults and done >= db_faults[0][0] * self.budget:
                _, fault = db_faults.pop(0)
                self.log.append((time.monotonic() - started, f"{fault} at {done} COMPLETE"))
                if fault == "restart":
                    self.backend.act("restart")
                else:
                    self.backend.act("down")
                    self.halt.wait(self.outage)
                    self.backend.act("up")
            live = [p for p in LIVE if p.poll() is None]
            if len(self.killed) < self.kills and time.monotonic() >= next_kill and live and done < self.budget:
                victim = rng.choice(live)
                try:
                    os.killpg(victim.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed.append(victim.pid)
                self.log.append((time.monotonic() - started, f"SIGKILL worker {victim.pid}"))
                self.start_worker()
                next_kill = time.monotonic() + self.kill_every

    def stop(self) -> None:
        self.halt.set()
        self.join()


def kill_workers() -> None:
    """SIGTERM every live worker's process group (a worker fails its running trial and exits), then SIGKILL
    what is left after KILL_GRACE_S. Only the groups of processes this bench started."""
    for p in LIVE:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + KILL_GRACE_S
    for p in LIVE:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    LIVE.clear()


def default_timeout(n: int, args) -> float:
    """Seconds an N may run: thrice the budget at N workers' linear pace, but at least MIN_TRIAL_PACE_S a trial
    (many workers on few cores are paced by the cores, not by N), plus START_S for the workers' start-up."""
    return START_S + 3 * args.trials * max(args.trial_seconds / n, MIN_TRIAL_PACE_S)


def worker_command(app: Path, url: str, args, n: int, i: int, runs: Path) -> list[str]:
    return [sys.executable, str(app), "--multirun", "hydra/sweeper=optuna_pruning",
            f"hydra/sweeper/sampler={args.sampler}", "hydra.sweeper.sampler.seed=0",
            f"hydra.sweeper.storage='{url}'", f"hydra.sweeper.study_name={STUDY}",
            "hydra.sweeper.total_budget=true", f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.n_jobs=1",
            f"hydra.sweeper.heartbeat_interval={args.heartbeat}",
            # job folders are numbered per worker from 0: each worker needs a sweep folder of its own
            f"hydra.sweep.dir='{runs / f'n{n}' / f'w{i}'}'",
            "x=interval(-5.0, 5.0)", "y=interval(-5.0, 5.0)",
            f"seconds={args.trial_seconds}", f"steps={args.steps}"]


def run_n(n: int, args, backend, app: Path, runs: Path, logs: Path) -> dict:
    """Start N workers on a fresh study, wait for them all, and measure."""
    url, database = backend.new_study_url(n)
    folder = logs / f"{backend.name}-n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    started = time.time()
    cpu_before = cpu_times()
    children_before = children_cpu_s()

    def start_worker() -> None:
        i = len(LIVE)
        with open(folder / f"worker-{i}.log", "w") as log:  # the child keeps its own handle
            LIVE.append(subprocess.Popen(worker_command(app, url, args, n, i, runs), cwd=app.parent, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    for _ in range(n):
        start_worker()
    poller = Poller([p.pid for p in LIVE], backend, database)  # the first N (not the replacements of --faults)
    poller.start()
    faults = None
    if args.faults:
        faults = Faults(backend, database, args.trials, start_worker, args.kills, args.kill_every, args.outage)
        faults.start()
    deadline = time.monotonic() + (args.timeout or default_timeout(n, args))
    timed_out = False
    try:
        while any(p.poll() is None for p in list(LIVE)):  # the replacements of --faults too
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        if faults:
            faults.stop()
        if timed_out:
            print(f"  N={n}: workers still running after the time limit: stopping them", flush=True)
        workers = list(LIVE)
        kill_workers()  # nothing is left running, whatever happened
        poller.stop()
    wall = time.time() - started
    cpu_after = cpu_times()
    busy = None
    if cpu_before and cpu_after and cpu_after[1] > cpu_before[1]:
        busy = (cpu_after[0] - cpu_before[0]) / (cpu_after[1] - cpu_before[1])
    killed = set(faults.killed) if faults else set()
    codes = [p.returncode for p in workers if p.pid not in killed]
    row = {"n": n, "storage": url.split("@")[-1] if "@" in url else url, "timed_out": timed_out,
           "run_s": round(wall, 1), "cpu_busy": busy, "exit_codes_nonzero": sorted(c for c in codes if c),
           "workers_cpu_s": children_cpu_s() - children_before,
           "peak_connections": poller.peak_connections,
           "rss_mib": rss_figures(poller), "workers_started": len(workers),
           "faults": [f"{t:.0f} s: {what}" for t, what in faults.log] if faults else []}
    try:
        study = optuna.load_study(study_name=STUDY, storage=url)
    except KeyError:  # no worker got as far as making the study: its logs say why
        print(f"!!! N={n}: no study was made; see {folder}", file=sys.stderr, flush=True)
        study = None
    return row | study_figures(study, args)


def rss_figures(poller: Poller) -> dict:
    peaks = [kib / 1024 for kib in poller.peak_rss.values() if kib]  # MiB
    if not peaks:
        return {"max": None, "median": None, "total": None}
    return {"max": round(max(peaks), 1), "median": round(statistics.median(peaks), 1),
            "total": round(poller.peak_total_rss / 1024, 1)}


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank, so a p99 is a value that happened); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(seconds: list[float]) -> dict:
    return {"p50": quantile(seconds, 0.5) and round(quantile(seconds, 0.5) * 1000, 1),
            "p99": quantile(seconds, 0.99) and round(quantile(seconds, 0.99) * 1000, 1),
            "mean": round(statistics.fmean(seconds) * 1000, 1) if seconds else None, "count": len(seconds)}


def study_figures(study: optuna.Study | None, args) -> dict:
    reads, trials = [], []
    for _ in range(READS if study else 0):  # what one full read of the finished study costs (the plugin reads it
        began = time.perf_counter()  # several times per trial; Optuna's cache keeps finished trials per process)
        trials = study.get_trials(deepcopy=False)
        reads.append(time.perf_counter() - began)
    states = {s.name: 0 for s in TrialState}
    for t in trials:
        states[t.state.name] += 1
    numbers = [t.number for t in trials]
    checks = {"complete": states["COMPLETE"], "budget": args.trials,
              "duplicate_numbers": len(numbers) - len(set(numbers)), "running": states["RUNNING"],
              "fail": states["FAIL"], "states": {k: v for k, v in states.items() if v}}
    checks["exact"] = (checks["complete"] == args.trials and not checks["duplicate_numbers"]
                       and not checks["running"])
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    window = (max(ends) - min(starts)) if starts and ends else None
    rate = states["COMPLETE"] / window if window else None

    by_worker: dict[str, list] = {}
    for t in trials:
        if t.datetime_start:
            by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
    gaps, firsts = [], []
    for own in by_worker.values():
        own.sort(key=lambda t: t.datetime_start)
        firsts.append(own[0].datetime_start.timestamp())
        for before, after in zip(own, own[1:]):
            if before.datetime_complete:
                gaps.append((after.datetime_start - before.datetime_complete).total_seconds())
    overhead, before_job, in_job, after_job = [], [], [], []
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        start, end = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
        overhead.append(end - start - args.trial_seconds)
        job = t.user_attrs.get("bench_job")
        if job:
            before_job.append(job[0] - start)
            in_job.append(job[1] - job[0] - args.trial_seconds)
            after_job.append(end - job[1])
    return {"trials_per_s": rate, "window_s": window, "workers_seen": len(by_worker),
            "study_read_ms": {"cold": round(reads[0] * 1000, 1) if reads else None,
                              "warm": round(statistics.median(reads[1:]) * 1000, 1) if reads[1:] else None},
            "ramp_up_s": (max(firsts) - min(firsts)) if firsts else None,
            "claim_gap_ms": ms(gaps), "overhead_ms": ms(overhead), "before_job_ms": ms(before_job),
            "in_job_ms": ms(in_job), "after_job_ms": ms(after_job), "checks": checks}


# -- report --------------------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def add_speedups(rows: list[dict]) -> None:
    base = next((r["trials_per_s"] for r in rows if r["n"] == 1 and r["trials_per_s"]), None)
    for r in rows:
        r["speedup"] = r["trials_per_s"] / base if base and r["trials_per_s"] else None
        r["efficiency"] = r["speedup"] / r["n"] if r["speedup"] else None


def claimed(row: dict) -> str:
    """Workers that never claimed a trial (the budget was spent before they started) are named in the N cell."""
    return "" if row["workers_seen"] >= row["n"] else f" ({row['workers_seen']} claimed)"


def cpu_per_trial(row: dict) -> float | None:
    """The workers' CPU seconds per COMPLETE trial, their start-up included."""
    used, done = row.get("workers_cpu_s"), row["checks"]["complete"]
    return used / done if used is not None and done else None


def table(rows: list[dict]) -> str:
    head = ("| N | trials/s | speed-up | efficiency | claim gap p50 / p99 ms | in-trial overhead p50 / p99 ms "
            "| ramp-up s | study read cold / warm ms | peak DB conns | RSS/worker max / median MiB | RSS total MiB "
            "| CPU busy | worker CPU s/trial | COMPLETE / budget | dup | RUNNING | FAIL | exact |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        c, g, o, m, rd = r["checks"], r["claim_gap_ms"], r["overhead_ms"], r["rss_mib"], r["study_read_ms"]
        lines.append(
            f"| {r['n']}{claimed(r)} | {fmt(r['trials_per_s'])} | {fmt(r['speedup'], '.2f')}"
            f" | {fmt(r['efficiency'] and 100 * r['efficiency'], '.0f')}{'%' if r['efficiency'] else ''}"
            f" | {fmt(g['p50'], '.0f')} / {fmt(g['p99'], '.0f')} | {fmt(o['p50'], '.0f')} / {fmt(o['p99'], '.0f')}"
            f" | {fmt(r['ramp_up_s'], '.1f')} | {fmt(rd['cold'], '.0f')} / {fmt(rd['warm'], '.0f')}"
            f" | {fmt(r['peak_connections'], 'd')}"
            f" | {fmt(m['max'], '.0f')} / {fmt(m['median'], '.0f')} | {fmt(m['total'], '.0f')}"
            f" | {fmt(r['cpu_busy'] and 100 * r['cpu_busy'], '.0f')}{'%' if r['cpu_busy'] else ''}"
            f" | {fmt(cpu_per_trial(r))}"
            f" | {c['complete']} / {c['budget']} | {c['duplicate_numbers']} | {c['running']} | {c['fail']}"
            f" | {'yes' if c['exact'] else '**NO**'} |")
    return "\n".join(lines)


def bottleneck(rows: list[dict], trial_seconds: float, cores: int) -> str:
    """The first N whose speed-up falls below LOW_EFFICIENCY of linear, and what its per-trial cycle lost against
    N=1's, split by where the time went; a cause is named only when it explains most of the loss."""
    base = next((r for r in rows if r["n"] == 1 and r["trials_per_s"]), None)
    if base is None:
        return "no N=1 row: no speed-up, so no bottleneck is named; see the figures"
    low = next((r for r in rows if r["n"] > 1 and r["efficiency"] and r["efficiency"] < LOW_EFFICIENCY), None)
    if low is None:
        return (f"no bottleneck in these figures: every N keeps at least {LOW_EFFICIENCY:.0%} of linear speed-up "
                f"(over N={', '.join(str(r['n']) for r in rows)})")
    n = low["n"]
    cycle_1, cycle_n = 1 / base["trials_per_s"], n / low["trials_per_s"]  # seconds per trial per worker
    loss = cycle_n - cycle_1
    def grew(key: str) -> float:  # seconds the mean of a figure grew from N=1 to N=n
        return ((low[key]["mean"] or 0) - (base[key]["mean"] or 0)) / 1000

    parts = {
        "claim gap (after tell, the claim lock's wait, the claim up to ask: _trial_loop.TrialLoop.run -> "
        "_study.claim_trials)": grew("claim_gap_ms"),
        "in-trial overhead (the proposal, Hydra's launch of the job, the reports, tell)": grew("overhead_ms"),
    }
    ramp = (low["ramp_up_s"] or 0) * n / max(1, low["checks"]["complete"])  # start-up spread, per trial per worker
    parts["workers starting late (ramp-up, spread over the trials)"] = ramp
    split = "; ".join(f"{name}: {delta:+.3f} s" for name, delta in parts.items())
    head = (f"first N below {LOW_EFFICIENCY:.0%} of linear: N={n} (speed-up {low['speedup']:.2f}, efficiency "
            f"{low['efficiency']:.0%}); each worker's cycle per trial is {cycle_n:.3f} s against {cycle_1:.3f} s "
            f"at N=1 ({trial_seconds:g} s of it the trial's work), {loss:+.3f} s: {split}")
    name, delta = max(parts.items(), key=lambda kv: kv[1])
    if loss > 0 and delta >= ATTRIBUTED * loss:
        cpu, per_trial = low["cpu_busy"], cpu_per_trial(low)
        saturated = f"; the CPU was {cpu:.0%} busy over the run" if cpu is not None else ""
        if per_trial:  # what the cores alone would allow, had nothing waited on a lock
            saturated += (f", and the workers used {per_trial:.2f} CPU s per trial (start-up included): {cores} "
                          f"cores allow about {cores / per_trial:.1f} trials/s at that cost, "
                          f"{low['trials_per_s']:.2f} measured")
        return f"{head}\nfirst bottleneck: {name}{saturated}"
    return f"{head}\nno single cause explains most of it; see the figures"


def plot(rows: list[dict], path: Path, title: str, trial_seconds: float) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install matplotlib, or the plugin's [mlflow] extra)"
    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.plot(ns, [r["trials_per_s"] for r in rows], "o-", label="measured")
    ax.plot(ns, [n / trial_seconds for n in ns], "--", color="grey", label="N / trial time (no overhead)")
    ax.set_ylabel("trials/s")
    ax.set_yscale("log")
    ax.legend()
    ax = axes[0][1]
    for key, label in (("claim_gap_ms", "claim gap"), ("overhead_ms", "in-trial overhead")):
        for q, style in (("p50", "o-"), ("p99", "x--")):
            ax.plot(ns, [r[key][q] for r in rows], style, label=f"{label} {q}")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(ns, [r["rss_mib"]["max"] for r in rows], "o-", label="per worker, max")
    ax.plot(ns, [r["rss_mib"]["median"] for r in rows], "x--", label="per worker, median")
    ax.set_ylabel("peak RSS MiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax = axes[1][1]
    if any(r["peak_connections"] is not None for r in rows):
        ax.plot(ns, [r["peak_connections"] for r in rows], "o-", label="peak DB connections")
    ax.plot(ns, [r["cpu_busy"] and 100 * r["cpu_busy"] for r in rows], "x--", label="CPU busy %")
    ax.legend()
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("workers N")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"figure: {path}"


# -- main ----------------------------------------------------------------------------------------------------------

def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts N, in the order run "
                        "(default: postgres 1 4 16 64, sqlite 1 2 4 8 16)")
    parser.add_argument("--trials", type=int, default=1000, help="the study's budget (n_trials) for each N")
    parser.add_argument("--trial-seconds", type=float, default=2.0, help="seconds of sleep per trial: its work")
    parser.add_argument("--steps", type=int, default=4, help="reports per trial (the last with last=True)")
    parser.add_argument("--sampler", default="tpe", help="hydra/sweeper/sampler (tpe: the plugin's default; "
                        "random leaves out the sampler's own cost)")
    parser.add_argument("--heartbeat", type=int, help="hydra.sweeper.heartbeat_interval, seconds (default 10, "
                        "--quick 2); a worker that finds the budget spent looks again after this long")
    parser.add_argument("--timeout", type=float, help="seconds one N may run before its workers are stopped "
                        "(default: 300 + 3 x trials x max(trial-seconds / N, 0.5))")
    parser.add_argument("--quick", action="store_true", help="CI size: N=1,2 (postgres: 1,4), 20 trials of 0.2 s")
    parser.add_argument("--faults", action="store_true", help="postgres: during each N, SIGKILL a random worker "
                        "every --kill-every s (a new one in its place) --kills times, restart PostgreSQL at 25%% and "
                        "55%% of the budget and stop it for --outage s at 75%%")
    parser.add_argument("--kills", type=int, default=20, help="--faults: workers SIGKILLed per N")
    parser.add_argument("--kill-every", type=float, default=5.0, help="--faults: seconds between two SIGKILLs")
    parser.add_argument("--outage", type=float, default=30.0, help="--faults: seconds PostgreSQL stays stopped")
    parser.add_argument("--out", type=Path, default=Path("outputs/scale"))
    args = parser.parse_args()
    if args.quick:
        if args.backend == "postgres" and not postgres_available():
            print("--quick: no PostgreSQL here (initdb or .ci/postgres.sh missing): SQLite instead")
            args.backend = "sqlite"
        args.workers = args.workers or ([1, 4] if args.backend == "postgres" else [1, 2])
        args.trials, args.trial_seconds, args.steps = 20, 0.2, 2  # 4 s of work at N=1: start-up dominates
        args.heartbeat = args.heartbeat or 2  # seconds: a short wait at the end, and a grace (6 s) a busy CI keeps
    if args.faults and args.backend != "postgres":
        parser.error("--faults needs --backend postgres (it restarts the database)")
    args.heartbeat = args.heartbeat or 10  # seconds: what a user would set (the README's example)
    args.workers = args.workers or ([1, 4, 16, 64] if args.backend == "postgres" else [1, 2, 4, 8, 16])
    return args


def main() -> int:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    host = machine()
    header = (f"{host['cpu']}; CPU flags: {host['flags']}; nproc {host['nproc']}; memory "
              f"{fmt(host['memory_gib'], '.1f')} GiB; load average at start "
              f"{' '.join(f'{x:.2f}' for x in host['load_average'] or [])}")
    setting = (f"{args.backend}, budget {args.trials} trials of {args.trial_seconds:g} s ({args.steps} reports), "
               f"sampler {args.sampler}, heartbeat {args.heartbeat} s, N = {' '.join(map(str, args.workers))}")
    print(f"sweep machinery at scale: {setting}\n{header}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM cleans up as Ctrl-C does
    base = args.out / f"scale-{args.backend}"
    rows: list[dict] = []
    backend = None
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        app = tmp / "app" / "app.py"
        app.parent.mkdir()
        app.write_text(APP)
        (app.parent / "config.yaml").write_text("x: 0.0\ny: 0.0\nsteps: 1\nseconds: 0.0\n")
        backend = Postgres() if args.backend == "postgres" else SQLite(tmp)
        for n in args.workers:
            print(f"N={n}: {n} worker(s) on one study, logs in {args.out / 'logs' / f'{backend.name}-n{n}'}",
                  flush=True)
            row = run_n(n, args, backend, app, tmp / "runs", args.out / "logs")
            rows.append(row)
            add_speedups(rows)
            print(f"  N={n}: {fmt(row['trials_per_s'])} trials/s, {row['checks']['complete']} COMPLETE in "
                  f"{fmt(row['window_s'], '.1f')} s (run {row['run_s']} s)", flush=True)
            if row["faults"]:
                c = row["checks"]
                print(f"  N={n} faults: {'; '.join(row['faults'])}; {row['workers_started']} workers started; "
                      f"after them: {c['complete']} COMPLETE of {c['budget']}, {c['duplicate_numbers']} duplicate "
                      f"numbers, {c['running']} RUNNING, states {c['states']}", flush=True)
            base.with_suffix(".json").write_text(json.dumps(
                {"setting": vars(args) | {"out": str(args.out)}, "machine": host, "rows": rows}, indent=1))
    finally:
        kill_workers()
        if backend is not None:
            backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    text = table(rows)
    verdict = bottleneck(rows, args.trial_seconds, host["nproc"])
    print(f"\n{setting}\n{header}\n\n{text}\n\n{verdict}")
    note = plot(rows, base.with_suffix(".png"), f"{setting}\n{host['cpu']} ({host['flags']}), nproc "
                f"{host['nproc']}", args.trial_seconds)
    print(note)
    base.with_suffix(".md").write_text(f"{setting}\n\n{header}\n\n{text}\n\n{verdict}\n")
    bad = [r for r in rows if not r["checks"]["exact"]]
    for r in rows:
        if r["exit_codes_nonzero"]:
            print(f"note: N={r['n']}: worker exit codes {r['exit_codes_nonzero']} (see their logs)")
    for r in bad:
        c = r["checks"]
        print(f"!!! EXACTNESS VIOLATED at N={r['n']}: {c['complete']} COMPLETE of a budget of {c['budget']}, "
              f"{c['duplicate_numbers']} duplicate trial numbers, {c['running']} RUNNING, states {c['states']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after main's cleanup: no traceback for asking it to stop
        print("interrupted: every worker and PostgreSQL stopped; the Ns measured so far are in the JSON",
              file=sys.stderr)
        sys.exit(130)

"""Local worker processes of one sweep (`hydra.sweeper.local_workers: true`): n_jobs copies of the sweep's own
command line, each running the sweeper's claim loop one trial at a time, so a core takes the next trial as soon as
its own ends or is pruned (no batch barrier). No study, MLflow or app here: processes, their environment and
their signals.

The sweeper's own process starts them and only waits: it stops the others when one fails, forwards Ctrl-C and
SIGTERM, and says when one dies. A worker learns what it is from one environment variable (LocalWorker); the
storage URL reaches it in the inherited environment, never on its command line (it may hold a password).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from ._errors import Terminated
from ._names import LOCAL_WORKER_ENV

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.2  # seconds between looks at the workers: the delay before a failed worker's siblings are stopped
SUPPORTED = os.name == "posix"  # signal masks and inherited pipes; elsewhere the sweeper launches batches


@dataclass(frozen=True)
class LocalWorker:
    """What a local worker is told: its study, the budget of this invocation, and where to write the one line
    that explains its failure (a pipe the main process reads: only the first failure's line is shown)."""

    study: str
    n_trials: int
    report_fd: int

    def env(self) -> dict[str, str]:
        fields = {"study": self.study, "n_trials": self.n_trials, "report_fd": self.report_fd}
        return {LOCAL_WORKER_ENV: json.dumps(fields)}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "LocalWorker | None":
        """The worker this process is, or None in the sweep's main process (and outside a sweep)."""
        if not env.get(LOCAL_WORKER_ENV):
            return None
        fields = json.loads(env[LOCAL_WORKER_ENV])
        return cls(fields["study"], int(fields["n_trials"]), int(fields["report_fd"]))

    def report(self, line: str) -> None:
        """Hand the line that explains this worker's failure to the main process (one write: not interleaved)."""
        try:
            os.write(self.report_fd, (line.rstrip("\n") + "\n").encode())
        except OSError:  # the main process is gone: nobody else will say it
            print(line, file=sys.stderr, flush=True)


def worker_command(orig_argv: Sequence[str], executable: str, sweep_dir: Path) -> list[str]:
    """The sweep's own command line again (interpreter options, script or -m module, overrides), run by this
    interpreter, writing its job folders into the same sweep folder (the last hydra.sweep.dir= wins in Hydra)."""
    folder = str(sweep_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [executable, *orig_argv[1:], f"hydra.sweep.dir='{folder}'"]


def thread_env(env: Mapping[str, str], n_jobs: int, cores: int | None) -> dict[str, str]:
    """OMP_NUM_THREADS for one of n_jobs job processes sharing the cores (torch and numpy read it when they
    start), unless the user set it: cores // n_jobs, at least 1."""
    if n_jobs <= 1 or "OMP_NUM_THREADS" in env:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (cores or 1) // n_jobs))}


def worker_env(env: Mapping[str, str], worker: LocalWorker, n_jobs: int, cores: int | None) -> dict[str, str]:
    """A worker's whole environment: the sweep process's own (the storage URL, MLflow's), its share of the
    cores, and its LocalWorker."""
    return {**env, **thread_env(env, n_jobs, cores), **worker.env()}


def stop_once_on_signals() -> None:
    """In a worker: the first Ctrl-C or SIGTERM ends it the usual way (its trial FAIL, re-queued once, its run
    KILLED); later ones are ignored, since a Ctrl-C reaches the worker both from the terminal and from the main
    process. Then the signals the worker held back while it started are let in."""

    def stop(signum: int, frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored by whoever started the sweep: stays ignored
            signal.signal(sig, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def signal_name(returncode: int) -> str:
    """'SIGKILL' for a process that a signal ended (a negative return code), else 'exit <code>'."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


class Workers:
    """The running local workers of one sweep, as the main process sees them; a `with` block that no worker
    outlives: leaving it by an exception (Ctrl-C, SIGTERM, an error here) stops them and waits for them."""

    def __init__(self, procs: list[subprocess.Popen], reports: int, on_death: Callable[[subprocess.Popen], None],
                 previous_sigterm) -> None:
        self.procs = procs
        self.reports = reports  # read end of the workers' report pipe
        self.on_death = on_death
        self.previous_sigterm = previous_sigterm
        self.seen_dead: set[int] = set()

    @classmethod
    def start(cls, n: int, command: list[str], cwd: str, env: Mapping[str, str], study: str, n_trials: int,
              cores: int | None, on_death: Callable[[subprocess.Popen], None]) -> "Workers":
        """n workers of `command`; `on_death` is called once for each one a signal kills. They start with Ctrl-C
        and SIGTERM blocked, so a signal that comes while they import and compose their config waits until they
        can end cleanly (stop_once_on_signals). SIGTERM to this process raises Terminated from now on (a Hydra
        app may not handle it), so that it reaches the workers too."""
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
        read, write = os.pipe()
        os.set_blocking(read, False)
        env = worker_env(env, LocalWorker(study, n_trials, write), n, cores)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        procs: list[subprocess.Popen] = []
        try:
            for _ in range(n):
                procs.append(subprocess.Popen(command, cwd=cwd, env=env, pass_fds=(write,)))
        except BaseException:
            for p in procs:
                p.kill()
                p.wait()
            os.close(read)
            _restore(signal.SIGTERM, previous)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            os.close(write)
        return cls(procs, read, on_death, previous)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None:
                plain_ctrl_c = isinstance(error, KeyboardInterrupt) and not isinstance(error, Terminated)
                self.stop(signal.SIGINT if plain_ctrl_c else signal.SIGTERM)
        finally:
            if _in_main_thread():
                _restore(signal.SIGTERM, self.previous_sigterm)
            os.close(self.reports)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait(self) -> subprocess.Popen | None:
        """Wait until every worker has ended. A worker that exits non-zero stops the others (SIGTERM) and is
        returned; one that a signal killed goes to `on_death`, and its siblings go on."""
        while True:
            for p in self.procs:
                if p.poll() is not None and p.returncode > 0:
                    self.stop(signal.SIGTERM)
                    return p
            self._report_deaths()
            if all(p.returncode is not None for p in self.procs):
                return None
            time.sleep(POLL_S)

    def stop(self, sig: int) -> None:
        """Send `sig` to the live workers and wait for all of them. A second Ctrl-C or SIGTERM meanwhile kills
        them (their trials then go to `on_death`)."""

        def kill(signum: int, frame) -> None:
            for p in self.procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGKILL)

        previous = {s: signal.signal(s, kill) for s in STOP_SIGNALS} if _in_main_thread() else {}
        try:
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(sig)
            while any(p.poll() is None for p in self.procs):
                time.sleep(POLL_S)
        finally:
            for s, handler in previous.items():
                _restore(s, handler)
        self._report_deaths()

    def _report_deaths(self) -> None:
        for p in self.procs:
            if p.returncode is not None and p.returncode < 0 and p.pid not in self.seen_dead:
                self.seen_dead.add(p.pid)
                self.on_death(p)

    def failure_lines(self) -> list[str]:
        """The lines failed workers wrote to explain themselves, first failure first."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.reports, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return [line for line in b"".join(chunks).decode(errors="replace").splitlines() if line.strip()]


class WorkerFailed(Exception):
    """A local worker exited non-zero and the others were stopped: the sweep exits with `code` after `line`."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(line)
        self.code = code
        self.line = line


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminated_on_sigterm() -> Iterator[None]:
    """SIGTERM (kill, `timeout`, docker stop) ends the sweep as Ctrl-C does, with its trials failed and re-queued,
    where the app left SIGTERM's default, which kills the process on the spot and leaves its trials RUNNING. An
    app's own handler, or SIGTERM ignored, is kept."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there can handlers be set


def _restore(sig: int, handler) -> None:
    signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python

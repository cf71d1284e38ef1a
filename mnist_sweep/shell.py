"""The shell every `python -m mnist_sweep...` command runs in, and the defaults the commands share.

A command ends in one of four ways, the same in each:
- done: its own exit status (0, or 1 where it says "the result is not what was asked", e.g. a replay that differs);
- a problem the user can fix (UserError, and the sweeper's StopSweep): one `error:` line on stderr, every URL
  password in it masked, exit 2;
- Ctrl-C: one `interrupted: <what was stopped>` line, exit 130;
- SIGTERM (kill, docker stop, SLURM, Kubernetes): raised as the sweeper's Terminated, a KeyboardInterrupt, so the
  command's Ctrl-C paths run (MLflow runs end KILLED, child processes are stopped); one
  `terminated (SIGTERM): <what was stopped>` line, exit 143.
Anything else is a bug and keeps its traceback.

    @shell.command(stopped="no results written")
    def main(argv: list[str] | None = None) -> int:
        ...
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import StopSweep, Terminated, UserError
from hydra_plugins.hydra_optuna_pruning_sweeper import mask_secrets

# Where the commands that read a sweep look unless told otherwise (--tracking-uri, --storage): where a sweep with
# the app's defaults records, relative to the working directory (the MLflow store is what plain `mlflow ui`
# opens). conf/config.yaml's mlflow.tracking_uri and conf/storage/sqlite.yaml's url hold the same values.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "sqlite:///outputs/optuna.db"

ERROR_EXIT = 2  # a problem the user can fix, as argparse exits on a bad option
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for a process that Ctrl-C ended
TERMINATED_EXIT = 143  # 128 + SIGTERM
SHOWN = (UserError, StopSweep, KeyboardInterrupt)  # the exceptions a command ends with in one line

Main = Callable[[Optional[Sequence[str]]], int]


def error_line(e: BaseException | str) -> str:
    """A problem as the user sees it: `error: <message>`, with every URL password masked."""
    return f"error: {mask_secrets(str(e))}"


def stop_line(e: KeyboardInterrupt, stopped: str) -> str:
    """Ctrl-C or SIGTERM as the user sees it, with what the command stopped (`stopped`)."""
    how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    return f"{how}: {stopped}"


def exit_status(e: BaseException, stopped: str) -> int:
    """Print the one line for `e` (one of SHOWN) on stderr; the exit status the command ends with."""
    if isinstance(e, KeyboardInterrupt):
        print(stop_line(e, stopped), file=sys.stderr, flush=True)
        return TERMINATED_EXIT if isinstance(e, Terminated) else INTERRUPTED_EXIT
    print(error_line(e), file=sys.stderr, flush=True)
    return ERROR_EXIT


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler: SIGTERM ends a command the way Ctrl-C does, not abruptly."""
    raise Terminated()


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """raise_terminated as the SIGTERM handler while the block runs, then the one before it again (tests call
    main() inside pytest, which must keep its own). Python sets handlers only in the main thread: elsewhere this
    changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:  # None: a handler set outside Python, which Python cannot put back; the default is the closest
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def command(stopped: str) -> Callable[[Main], Main]:
    """A command's `main(argv) -> exit status` run in the shell; `stopped`: what Ctrl-C or SIGTERM leaves behind,
    said after `interrupted:` (e.g. "no results written", "the replay's MLflow run is marked KILLED")."""
    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            with sigterm_raises_terminated():
                try:
                    return main(argv)
                except SHOWN as e:
                    return exit_status(e, stopped)
        return run
    return wrap

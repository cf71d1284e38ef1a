"""The errors a person sees: one clear sentence, no stack trace.

The CLI prints these as they are and exits non-zero; anything else is a bug and keeps its traceback.
"""


class StopSweep(Exception):
    """Raised by a sweep's job (any app): the sweeper marks the trial FAIL and stops the whole sweep with this
    message, since every other trial would fail the same way (a config error, missing data)."""


class UserError(Exception):
    """A problem the user can fix: the message names the key, the value and what is allowed."""


class ConfigError(UserError, StopSweep):
    """A config value is out of range or inconsistent. Raised before any training starts."""


class DataError(UserError, StopSweep):
    """MNIST could not be found, downloaded or parsed."""


class DivergedError(UserError):
    """The training loss became NaN or infinite."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, SLURM, Kubernetes), handled like Ctrl-C: runs end KILLED, trials FAIL and are
    re-run once on resume, and the process exits 143. A KeyboardInterrupt, so every Ctrl-C path applies."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (drivers add pages of context); the
    database's own error where a wrapper (Optuna's StorageInternalError, SQLAlchemy's .orig) hides it."""
    if e.__cause__ is not None and type(e).__name__ == "StorageInternalError":
        e = e.__cause__
    text = str(getattr(e, "orig", None) or e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"

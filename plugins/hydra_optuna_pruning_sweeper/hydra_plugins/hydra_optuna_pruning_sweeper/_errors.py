"""The errors a person sees: one clear sentence, no stack trace. The sweeper prints these as one `error:` line and
exits 2; anything else is a bug and keeps its traceback. Apps raise StopSweep (or ConfigError) from a job to stop
the whole sweep."""

import re


class StopSweep(Exception):
    """Raised by a sweep's job (any app): the sweeper marks the trial FAIL and stops the whole sweep with this
    message, since every other trial would fail the same way (a config error, missing data)."""


class UserError(Exception):
    """A problem the user can fix: the message names the key, the value and what is allowed."""


class ConfigError(UserError, StopSweep):
    """A config value is out of range or inconsistent. Raised before any training starts."""


class JobInterrupted(Exception):
    """A launcher's job that ended without its trial's result, stopped from outside: cancelled (scancel), out of
    its time limit, its node lost, its process killed. The sweeper handles the trial as interrupted, like Ctrl-C:
    FAIL with this message, its MLflow run KILLED, its parameters queued to run again once."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, SLURM, Kubernetes), handled like Ctrl-C: runs end KILLED, trials FAIL and are
    re-run once on resume, and the process exits 143. A KeyboardInterrupt, so every Ctrl-C path applies."""


MAX_LINE = 300  # characters of an exception shown inside a message: enough to say why, never a page

# Exceptions that only wrap another one (their __cause__), which says more than the wrapper. Named, not imported,
# so that this module needs neither Optuna nor a database driver.
WRAPPERS = ("optuna.exceptions.StorageInternalError",)


def one_line(e: BaseException, *, typed: bool = True) -> str:
    """An exception as one line for a person: `Type: first line of the message`, at most MAX_LINE characters.

    Drivers add pages of context (SQL, links) after the first line, so it is the one kept; but a line that ends
    with ':' introduces the next one and keeps it (torchvision: "Error downloading x:", "Tried <mirror>, got:",
    then the reason). A wrapper's cause, and the driver's error a SQLAlchemy error holds in `.orig`, say what went
    wrong: their text is used. typed=False leaves out the type where it tells a user nothing; an empty message
    gives the type's name alone."""
    if e.__cause__ is not None and any(f"{c.__module__}.{c.__qualname__}" in WRAPPERS for c in type(e).__mro__):
        e = e.__cause__
    orig = getattr(e, "orig", None)
    kept: list[str] = []
    for line in filter(None, map(str.strip, str(orig if isinstance(orig, BaseException) else e).splitlines())):
        if kept and not kept[-1].endswith(":"):
            break
        kept.append(line)
    text = " ".join(kept)
    if typed or not text:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def unresolved(e: BaseException) -> ConfigError:
    """OmegaConf's error for an interpolation that does not resolve (an unset variable in ${oc.env:VAR}, a key that
    is not there) as one line naming the key; the caller raises it."""
    key = getattr(e, "full_key", "") or "a config value"
    text = one_line(e, typed=False)
    missing = re.search(r"Environment variable '([^']+)' not found", text)
    if missing:
        var = missing.group(1)
        return ConfigError(f"{key}: the environment variable {var} that it reads (${{oc.env:{var}}}) is not set; "
                           f"export it, or give it a default: ${{oc.env:{var},<default>}}")
    return ConfigError(f"{key} could not be resolved: {text}")

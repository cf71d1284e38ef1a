"""The errors a person sees: one clear sentence, no stack trace.

The CLI prints these as they are and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the key, the value and what is allowed."""


class ConfigError(UserError):
    """A config value is out of range or inconsistent. Raised before any training starts."""


class DataError(UserError):
    """MNIST could not be found, downloaded or parsed."""


class DivergedError(UserError):
    """The training loss became NaN or infinite."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, SLURM, Kubernetes), handled like Ctrl-C: runs end KILLED, trials FAIL and are
    re-run once on resume, and the process exits 143. A KeyboardInterrupt, so every Ctrl-C path applies."""

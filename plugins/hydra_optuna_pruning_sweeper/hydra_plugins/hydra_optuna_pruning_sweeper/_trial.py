"""A job's side of a trial: `current_trial()` finds the trial this process runs (from the environment the sweeper
set) and `report(value, step)` records each step's value, which lets the pruner stop it. Outside a sweep it is a
no-op, and nothing here imports Optuna until a trial is really reported to.

    from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial

    trial = current_trial()
    for epoch in range(1, epochs + 1):
        ...
        trial.report(val_acc, step=epoch)  # raises optuna.TrialPruned when the pruner says stop
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ._clock import deadline_from_env, past
from ._errors import ConfigError
from ._names import DEADLINE_ENV, PRUNER_ENV, STORAGE_ENV, STORAGE_WAIT_ENV, STUDY_ENV, TRIAL_ENV

if TYPE_CHECKING:
    import optuna

PRUNER_TARGETS = "optuna.pruners."  # what PRUNER_ENV may build


@dataclass(frozen=True)
class TrialRef:
    """What a trial's job needs to find its trial; crosses processes as environment variables."""

    storage: str
    study: str
    number: int
    pruner: str = "{}"  # JSON of the pruner's _target_ and arguments; {} never prunes
    deadline: float | None = None  # Unix time at which the sweep's time budget ends; None: no timeout
    storage_wait: float = 0.0  # seconds a report waits for a storage that stopped answering (_outage.py)

    def job_env(self) -> dict[str, str]:
        """The per-trial part, set in the job's environment by the launcher (no secret in it)."""
        return {STUDY_ENV: self.study, TRIAL_ENV: str(self.number)}

    def sweep_env(self) -> dict[str, str]:
        """The part shared by every trial of the sweep, set in the sweeper's own environment (the storage URL)."""
        return {STORAGE_ENV: self.storage, PRUNER_ENV: self.pruner,
                DEADLINE_ENV: "" if self.deadline is None else repr(self.deadline),
                STORAGE_WAIT_ENV: repr(self.storage_wait)}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TrialRef | None":
        """The trial this process runs, or None outside a sweep."""
        if not env.get(TRIAL_ENV) or not env.get(STORAGE_ENV):
            return None
        return cls(env[STORAGE_ENV], env[STUDY_ENV], int(env[TRIAL_ENV]), env.get(PRUNER_ENV) or "{}",
                   deadline_from_env(env), _seconds(env.get(STORAGE_WAIT_ENV)))


def _seconds(text: str | None) -> float:
    try:
        return max(0.0, float(text or 0))
    except ValueError:
        return 0.0


def build_pruner(spec: str) -> "optuna.pruners.BasePruner":
    """A pruner from its JSON spec ({"_target_": "optuna.pruners.X", **arguments}); none: NopPruner."""
    import optuna

    kwargs = json.loads(spec)
    target = kwargs.pop("_target_", None)
    kwargs.pop("_partial_", None)
    if not target:
        return optuna.pruners.NopPruner()
    if not target.startswith(PRUNER_TARGETS):
        raise ConfigError(f"hydra.sweeper.pruner._target_={target!r} is not allowed: use optuna.pruners.*")
    try:
        return getattr(optuna.pruners, target.removeprefix(PRUNER_TARGETS))(**kwargs)
    except (AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"hydra.sweeper.pruner: {target} could not be built: {e}") from None


class TrialReport:
    """A job's link to its trial: `report(value, step)` each epoch (or any step), which raises optuna.TrialPruned
    when the pruner says stop. Multi-objective trials are not pruned (Optuna cannot); they record the values."""

    def __init__(self, ref: TrialRef) -> None:
        from . import _optuna_adapter
        from ._outage import is_transient, patience
        from ._study import quiet_optuna, report_storage

        quiet_optuna()
        self.patient = patience(ref.storage_wait, ref.storage).call  # reports ride out an outage too

        def open_storage():  # mid-sweep: a storage that is down now is waited for, as the sweeper's steps are
            try:
                return report_storage(ref.storage)  # reports only: the sweeper keeps the heartbeat
            except ConfigError as e:
                if e.__cause__ is not None and is_transient(e.__cause__):
                    raise e.__cause__ from None
                raise

        storage = self.patient(open_storage)
        study = self.patient(lambda: _loaded_study(storage, ref.study, ref.pruner))
        self.trial = self.patient(lambda: _optuna_adapter.running_trial(study, storage, ref.number))
        self.number = ref.number
        self.study = ref.study
        self.deadline = ref.deadline
        self.multi_objective = len(study.directions) > 1

    def report(self, value: float, step: int, last: bool = False) -> None:
        """`last`: the job's final step is recorded but never pruned: the work is done, and a pruner that judges
        every step (successive halving has a rung at 9 epochs of a 9-epoch trial) would throw a finished result
        away as PRUNED."""
        import optuna

        if self.multi_objective:
            self.patient(lambda: self.trial.set_user_attr(f"step_{step}", value))
        else:
            self.patient(lambda: self.trial.report(value, step=step))
            if not last and self.patient(self.trial.should_prune):
                raise optuna.TrialPruned(f"pruned at step {step}: value {value:.4g}")
        if not last and past(self.deadline):
            raise optuna.TrialPruned(f"stopped at step {step} (value {value:.4g}): the sweep's time budget "
                                     "(hydra.sweeper.timeout) ran out")

    def set_user_attr(self, key: str, value: Any) -> None:
        self.trial.set_user_attr(key, value)


class NoTrial:
    """Outside a sweep: reports go nowhere, so the same code runs alone and as a trial."""

    number = None
    study = None

    def report(self, value: float, step: int, last: bool = False) -> None:
        pass

    def set_user_attr(self, key: str, value: Any) -> None:
        pass


def current_trial(env: Mapping[str, str] | None = None) -> TrialReport | NoTrial:
    """The trial this process runs for the sweeper (`hydra/sweeper=optuna_pruning`), or a no-op outside a sweep
    (see the module's docstring)."""
    ref = TrialRef.from_env(os.environ if env is None else env)
    return NoTrial() if ref is None else _trial_report(ref)


@functools.lru_cache(maxsize=4)
def _loaded_study(storage, name: str, pruner: str) -> "optuna.Study":
    """One Study per study per process, shared by the trials it runs (a local worker runs many): Optuna keeps the
    finished trials a Study has read, and a pruner reads the whole study at each report, so a Study loaded afresh
    for each trial would load every finished trial again."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage, pruner=build_pruner(pruner))


@functools.lru_cache(maxsize=4)
def _trial_report(ref: TrialRef) -> TrialReport:
    return TrialReport(ref)  # one per trial per process: loading the study is a database round trip

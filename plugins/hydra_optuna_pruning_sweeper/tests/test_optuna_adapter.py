"""What _optuna_adapter relies on in Optuna's storage layer (its RELIED_ON list) is still there, with the same
parameters, in the installed Optuna: a supported Optuna version that renames or reorders one fails here, not in
the middle of a sweep. And no other module of the plugin reaches past Optuna's public study API."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hydra_plugins.hydra_optuna_pruning_sweeper import _optuna_adapter as adapter

PARAMETER_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def label(entry) -> str:
    owner, attribute, _ = entry
    return f"{getattr(owner, '__name__', owner)}.{attribute}"


@pytest.mark.parametrize("entry", adapter.RELIED_ON, ids=label)
def test_each_relied_on_call_takes_the_arguments_the_adapter_passes(entry):
    """The adapter passes these arguments by position, in this order: they must be the callable's first
    parameters (after self), and any further ones must have defaults."""
    owner, attribute, params = entry
    if params is None:  # a plain attribute, checked on an instance below
        return
    function = getattr(owner, attribute, None)
    assert callable(function), f"{label(entry)} is gone from this Optuna"
    signature = list(inspect.signature(function).parameters.values())
    static = isinstance(inspect.getattr_static(owner, attribute, None), (staticmethod, classmethod))
    if inspect.isclass(owner) and not static:  # a method looked up on the class: the first parameter is self
        signature = signature[1:]
    positional = [p for p in signature if p.kind in PARAMETER_KINDS]
    assert [p.name for p in positional[:len(params)]] == list(params), f"{label(entry)}{inspect.signature(function)}"
    rest = [p for p in signature[len(params):] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert all(p.default is not p.empty for p in rest), f"{label(entry)} now needs more: {rest}"


def test_a_storage_has_the_sqlalchemy_engine_the_claim_lock_uses(tmp_path):
    storage = RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    try:
        assert isinstance(adapter.engine(storage), sqlalchemy.Engine)
        assert adapter.engine(storage).url.get_backend_name() == "sqlite"
    finally:
        storage.engine.dispose()


def test_every_storage_method_the_adapter_calls_is_listed():
    """A call added to the adapter without an entry in RELIED_ON would go unchecked: the adapter's `storage.X`
    are read from its source."""
    source = ast.parse(Path(adapter.__file__).read_text())
    used = {node.attr for node in ast.walk(source)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "storage"}
    listed = {attribute for owner, attribute, _ in adapter.RELIED_ON if owner is RDBStorage}
    assert used and used <= listed, used - listed


def test_the_adapter_works_against_a_real_study(tmp_path):
    """The same calls, made: a trial found by number, a user attr set from outside, a heartbeat, a live Trial
    that another process reports to."""
    import optuna

    storage = RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=60)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    number = trial.number
    assert adapter.trial_id(storage, "s", number) == trial._trial_id
    adapter.set_trial_user_attr(storage, "s", number, "worker", "host:1")
    adapter.record_heartbeat(storage, adapter.trial_id(storage, "s", number))
    assert adapter.heartbeat_interval(storage) == 60
    live = adapter.running_trial(study, storage, number)
    live.report(0.5, step=1)
    adapter.fail_stale_trials(study)  # a fresh heartbeat: nothing is stale
    (frozen,) = study.trials
    assert frozen.user_attrs["worker"] == "host:1" and frozen.intermediate_values == {1: 0.5}
    assert frozen.state == optuna.trial.TrialState.RUNNING

PACKAGE = Path(adapter.__file__).parent
# what only the adapter may write: the storage's engine and per-trial calls, the Trial constructor, stale trials
INTERNALS = re.compile(r"\.engine\b|\.record_heartbeat\(|get_heartbeat_interval|get_trial_id_from|get_study_id_from|"
                       r"storage\.set_trial_user_attr|trial\.Trial\(|storages\.fail_stale_trials|"
                       r"RetryHeartbeatStaleTrialCallback")


def test_the_adapter_reports_heartbeats_and_retries_through_optuna(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=60,
                                         heartbeat_stale_trial_callback=adapter.stale_trial_retry())
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    tid = adapter.trial_id(storage, "s", trial.number)
    assert adapter.heartbeat_interval(storage) == 60
    adapter.record_heartbeat(storage, tid)
    adapter.set_trial_user_attr(storage, "s", trial.number, "k", "v")
    live = adapter.running_trial(study, storage, trial.number)
    live.report(0.5, step=1)
    study.tell(trial.number, state=TrialState.FAIL)
    adapter.queue_retry(study, study.trials[0])
    failed, retry = study.trials
    assert failed.user_attrs["k"] == "v" and failed.intermediate_values == {1: 0.5}
    assert adapter.retried_trial_number(retry) == 0 and adapter.is_retry(retry) and not adapter.is_retry(failed)
    adapter.fail_stale_trials(study)  # nothing stale: no change
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]


def test_no_other_module_reaches_into_optunas_storage():
    reaching = [f"{p.name}:{i}: {line.strip()}" for p in sorted(PACKAGE.glob("*.py")) if p.name != "_optuna_adapter.py"
                for i, line in enumerate(p.read_text().splitlines(), 1) if INTERNALS.search(line)]
    assert reaching == []

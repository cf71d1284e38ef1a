"""What _optuna_adapter relies on in Optuna's storage layer (its RELIED_ON list) is still there, with the same
parameters, in the installed Optuna: a supported Optuna version that renames or reorders one fails here, not in
the middle of a sweep."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import sqlalchemy
from optuna.storages import RDBStorage

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
    if inspect.isclass(owner):  # looked up on the class: the first parameter is self
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

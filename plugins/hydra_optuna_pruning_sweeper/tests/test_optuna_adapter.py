"""What _optuna_adapter.py relies on in Optuna's storage layer is still there, with the parameters it passes: an
Optuna version that renames or drops one fails here, not halfway through a sweep. And no other module of the
plugin reaches past Optuna's public study API."""

import inspect
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.hydra_optuna_pruning_sweeper import _optuna_adapter as adapter

PACKAGE = Path(adapter.__file__).parent
# what only the adapter may write: the storage's engine and per-trial calls, the Trial constructor, stale trials
INTERNALS = re.compile(r"\.engine\b|\.record_heartbeat\(|get_heartbeat_interval|get_trial_id_from|get_study_id_from|"
                       r"storage\.set_trial_user_attr|trial\.Trial\(|storages\.fail_stale_trials|"
                       r"RetryHeartbeatStaleTrialCallback")


@pytest.mark.parametrize("owner, name, parameters", adapter.RELIED_ON,
                         ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in adapter.RELIED_ON])
def test_what_the_adapter_relies_on_is_in_this_optuna(owner, name, parameters, tmp_path):
    if parameters is None:  # an attribute set on the instance
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
        assert hasattr(storage, name)
        return
    member = getattr(owner, name)
    assert callable(member)
    accepted = inspect.signature(member).parameters
    assert all(p in accepted for p in parameters), f"{name}{inspect.signature(member)} lacks one of {parameters}"


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

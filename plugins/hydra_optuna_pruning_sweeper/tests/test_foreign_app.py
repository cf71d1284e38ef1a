"""The plugin as a stranger's Hydra app meets it (issue 22's "done when"): an app that knows nothing of this
repository, with a config of its own and no sweeper settings in it, reports every step of its training through
`current_trial()`; the sweeper and the median pruner are chosen on the command line. The study ends with trials
pruned and completed, and none left RUNNING."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

TRAIN = '''
import hydra

from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial


@hydra.main(config_path=".", config_name="train")
def train(cfg):
    """A learning curve per learning rate: the loss falls with the epochs towards a floor set by how far lr is
    from 0.3, so a bad lr is bad from its first epoch on."""
    trial = current_trial()  # a no-op outside a sweep: the same app runs alone
    loss = None
    for epoch in range(1, cfg.epochs + 1):
        loss = (cfg.lr - 0.3) ** 2 + 1.0 / epoch
        trial.report(loss, epoch)  # raises optuna.TrialPruned when the pruner says stop
    return loss


if __name__ == "__main__":
    train()
'''

LEARNING_RATES = (0.9, 0.3, 0.5, 0.7, 0.1, 0.8)


def test_a_foreign_app_sweeps_with_median_pruning(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"lr": 0.01, "epochs": 6}))
    alone = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr[-3000:]  # no sweep: current_trial() reports nowhere
    # a grid with a fixed seed: each lr once, in one order (any order but one that improves on every trial prunes
    # some; this one does)
    result = subprocess.run(
        [sys.executable, "train.py", "--multirun", "hydra/sweeper=optuna_pruning", "hydra/sweeper/pruner=median",
         f"lr=choice({','.join(map(str, LEARNING_RATES))})", "hydra/sweeper/sampler=grid",
         "hydra.sweeper.sampler.seed=1", "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweep.dir=sweep"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (database,) = (tmp_path / "sweep").glob("*.db")  # storage null: the study lives in the sweep folder
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{database}")
    trials = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{database}").trials
    states = {t.params["lr"]: t.state for t in trials}
    assert sorted(states) == sorted(LEARNING_RATES), states
    assert TrialState.RUNNING not in states.values()
    assert set(states.values()) == {TrialState.COMPLETE, TrialState.PRUNED}, states
    for t in trials:  # every epoch a trial ran was reported, and a pruned one says where it stopped
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["end_reason"].startswith(f"pruned at step {max(t.intermediate_values)}")
        else:
            assert len(t.intermediate_values) == 6 and t.value == t.intermediate_values[6]
    assert states[0.3] == TrialState.COMPLETE  # the best lr is the best at every epoch: never pruned
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"lr": 0.3}

"""The equal-trials bench (mnist_sweep/overhead.py): what each study is told to run, its arithmetic on hand-made
timings, and the optuna peer's split of a number of trials over its workers."""

from pathlib import Path

import pytest

from mnist_sweep.config import compose_sweep
from mnist_sweep.overhead import COST_FIXED, Timed, fixed_overrides, main, ratios, study_command, table
from mnist_sweep.peer_optuna import trial_shares


def timed(study, repeat, seconds, complete=4):
    return Timed(study, repeat, [], seconds, 0, complete, complete, complete * 2, seconds * 1.5)


def test_both_studies_run_the_same_trials_of_one_net_without_pruning(tmp_path):
    ours = study_command("ours", tmp_path / "ours-r0", 3, 8, 2, ["data.root=/d"])
    peer = study_command("optuna", tmp_path / "optuna-r0", 3, 8, 2, ["data.root=/d"])
    assert ours[1:4] == ["-m", "mnist_sweep", "--multirun"]
    assert {"hydra.sweeper.n_trials=8", "hydra.sweeper.timeout=null", "hydra.sweeper.sampler.seed=3",
            "hydra.sweeper.study_name=ours-r0"} <= set(ours)
    assert peer[1:4] == ["-m", "mnist_sweep.peers", "optuna"] and peer[peer.index("--trials") + 1] == "8"
    assert peer[peer.index("--seed") + 1] == "3"
    shared = fixed_overrides(2, ["data.root=/d"])
    assert shared[-1] == "data.root=/d"  # the user's come last and win
    assert peer[peer.index("--") + 1:] == shared and set(shared) <= set(ours)


def test_the_pinned_net_leaves_only_work_free_keys_in_the_space():
    """The searched keys left must not change a trial's work: what is timed is the machinery, not the nets drawn."""
    from hydra_plugins.hydra_optuna_pruning_sweeper import space_from_overrides
    from mnist_sweep.sweepbench import override_keys, space_overrides

    space = compose_sweep(fixed_overrides(2, []))
    left, _, _ = space_from_overrides(space_overrides(space.params, override_keys(fixed_overrides(2, []))))
    assert left and set(left) <= {"optimizer.lr", "optimizer.weight_decay", "model.dropout", "model.conv_dropout"}
    assert space.pruner["_target_"] == "optuna.pruners.NopPruner"
    assert {k.split("=")[0] for k in COST_FIXED} <= set(space.params)  # each pins a key the space searches


def test_ratios_pair_each_repeat_with_the_reference_of_the_same_repeat():
    runs = [timed("ours", 0, 110.0), timed("optuna", 0, 100.0), timed("ours", 1, 99.0), timed("optuna", 1, 90.0)]
    assert ratios(runs, "ours") == pytest.approx([1.1, 1.1])
    assert ratios(runs, "optuna") == pytest.approx([1.0, 1.0])
    assert ratios(runs[:3], "ours") == pytest.approx([1.1])  # repeat 1 has no reference: no ratio
    text = table(runs, n_trials=4)
    assert "| ours | 2 | 104.5 ± 7.8 | 26.1 | 4/4 4/4 | 8 8 | 157 | 1.100 ± 0.000 |" in text
    one = table(runs[:2], n_trials=4)  # one repeat: its mean, with no spread that would read as none
    assert "| ours | 1 | 110.0 | 27.5 | 4/4 | 8 | 165 | 1.100 |" in one and "±" not in one


@pytest.mark.parametrize("n_trials,n_jobs,expected", [(8, 2, [4, 4]), (7, 2, [4, 3]), (1, 3, [1, 0, 0]),
                                                       (10, 4, [3, 3, 2, 2])])
def test_the_optuna_peer_splits_its_trials_exactly_over_its_workers(n_trials, n_jobs, expected):
    assert trial_shares(n_trials, n_jobs) == expected and sum(expected) == n_trials


def test_bad_arguments_are_one_line_before_any_study(tmp_path, capsys):
    assert main(["--trials", "0", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: --trials=0 must be >= 1"
    assert main(["model=huge", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model=huge" in err and len(err.strip().splitlines()) == 1
    assert not any(Path(tmp_path / "o").glob("*-r*"))


def test_the_peer_takes_a_number_of_trials_for_the_optuna_study_only(tmp_path, capsys):
    from mnist_sweep.peers import main as peers_main

    assert peers_main(["ray", "--folder", str(tmp_path), "--budget", "5", "--trials", "4"]) == 2
    assert "--trials=4: a number of trials >= 1, for the optuna study only" in capsys.readouterr().err

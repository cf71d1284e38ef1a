"""The figures behind the pruner's design, on hand-made curves: rank correlation per epoch, and pruners replayed."""

import optuna
import pytest

from mnist_sweep.fidelity import rank_correlation, ranks, replay, spearman


def test_ranks_share_ties_and_spearman_sees_order_not_scale():
    assert ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


# early epochs rank the trials backwards (a fast starter ends worst), the last-but-one already in order
CROSSING = [[0.90 + 0.01 * k, 0.95 + 0.001 * k, 0.96 - 0.001 * k, 0.97 - 0.001 * k] for k in range(6)]


def test_rank_correlation_per_epoch_over_full_length_curves_only():
    rho = rank_correlation(CROSSING + [[0.99, 0.99]])  # a pruned curve has no final value: left out
    assert rho[1] == (pytest.approx(-1.0), 6) and rho[2] == (pytest.approx(-1.0), 6)
    assert rho[3] == (pytest.approx(1.0), 6) and rho[4] == (pytest.approx(1.0), 6)
    assert rank_correlation([]) == {}


def test_a_replayed_pruner_that_judges_misleading_epochs_loses_the_best_trial():
    never = replay(CROSSING, optuna.pruners.NopPruner, orders=20)
    assert never.kept_best == 1.0 and never.epochs == 1.0 and never.best_found == pytest.approx(0.97)
    early = replay(CROSSING, lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
                   orders=50)
    late = replay(CROSSING, lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=3, reduction_factor=2),
                  orders=50)
    assert early.epochs < 1.0 and late.epochs < 1.0  # both prune
    assert early.kept_best < late.kept_best  # judging at epoch 1 throws the best away more often
    assert late.best_found > early.best_found


def test_with_an_epoch_budget_what_pruning_saves_buys_more_trials():
    # one good curve among poor ones that are poor from the start: pruning them pays for more draws
    curves = [[0.90, 0.95, 0.99]] + [[0.50 - 0.01 * k, 0.60 - 0.01 * k, 0.70 - 0.01 * k] for k in range(9)]
    never = replay(curves, optuna.pruners.NopPruner, orders=200, epoch_budget=9)
    median = replay(curves, lambda: optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0), orders=200,
                    epoch_budget=9)
    assert never.epochs == 1.0 and median.epochs < 1.0
    assert median.kept_best > never.kept_best and median.best_found > never.best_found

"""The worker-count bench (`python -m mnist_sweep.workercurve`): its figures on hand-made trials, and one quick run
of 2 local workers through the real CLI on tiny data (on a GPU machine the same runs share the GPU)."""

import json

import pytest

from mnist_sweep.sweepbench import Ran, Trial
from mnist_sweep.workercurve import markdown_table, point
from conftest import FAST, run_cli


def test_a_worker_counts_figures_are_per_minute_of_budget_and_within_it():
    trials = [Trial(0, "COMPLETE", 0.991, 20.0), Trial(1, "PRUNED", None, 25.0), Trial(2, "COMPLETE", 0.993, 50.0),
              Trial(3, "COMPLETE", 0.995, 70.0), Trial(4, "RUNNING", None, None)]  # 3 ended after the budget
    p = point(4, Ran(100.0, 160.0, 0, False), trials, targets=(0.99, 0.993, 0.995))
    assert p.trials == {"complete": 2, "pruned": 1, "other": 2}
    assert p.finished_per_minute == pytest.approx(3.0) and p.final_best == 0.993 and p.wall_seconds == 60.0
    assert p.to_target == {"0.990": 20.0, "0.993": 50.0, "0.995": None}
    table = markdown_table([p], (0.99, 0.993, 0.995))
    assert "| 4 | 3.0 | 2 / 1 / 2 | 99.30 | 20 | 50 | - | 60 |" in table


@pytest.mark.slow
def test_quick_worker_curve_runs_two_local_workers(tmp_path, mnist_root):
    out = tmp_path / "wc"
    fast = [o for o in FAST if not o.startswith("hydra.sweeper.n_jobs")]
    # two trials end the sweep before its 60 s (the time budget's end is the sweep's and tested there): what is
    # tested here is the bench around it
    proc = run_cli(["--quick", f"--out={out}", *fast, f"data.root={mnist_root}", "hydra.sweeper.n_trials=2"],
                   cwd=tmp_path, module="mnist_sweep.workercurve")
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = json.loads((out / "workercurve.json").read_text())["points"]
    assert [p["workers"] for p in points] == [2]
    for p in points:
        assert p["exit_code"] == 0 and p["trials"]["complete"] >= 1 and 0 < p["final_best"] <= 1
        assert p["trials"]["complete"] + p["trials"]["pruned"] == 2 and p["wall_seconds"] < 60 + 60
    assert "| workers | trials / min |" in proc.stdout and (out / "workercurve.png").stat().st_size > 5_000

"""The sweep benchmark: its arithmetic on hand-made trials and runs, its process handling, and one quick run of the
default studies and the bare Optuna peer on tiny data."""

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from mnist_sweep import sweepbench
from mnist_sweep.config import compose_sweep, override_text
from mnist_sweep.sweepbench import (Epoch, Ran, Run, StudyRun, Trial, best_so_far, best_trial, counts, failed_at_once,
                                    failure_line, main, markdown_table, matching_run, model_seconds,
                                    not_training_share, run_until, seed_band, study_overrides, summarize, time_to,
                                    trial_epochs, unpruned_share)
from conftest import FAST, run_cli

TRIALS = [Trial(0, "COMPLETE", 0.980, 10.0), Trial(1, "PRUNED", None, 12.0), Trial(2, "COMPLETE", 0.970, 20.0),
          Trial(3, "COMPLETE", 0.991, 30.0), Trial(4, "FAIL", None, 31.0), Trial(5, "COMPLETE", 0.991, 40.0),
          Trial(6, "COMPLETE", 0.995, 70.0), Trial(7, "RUNNING", None, None), Trial(8, "PRUNED", None, 65.0),
          Trial(9, "WAITING", None, None)]


def test_best_so_far_counts_complete_trials_within_the_budget():
    curve = best_so_far(TRIALS, budget=60)
    assert curve == [(10.0, 0.980), (30.0, 0.991)]  # 0.97 is no gain, trial 6 came after the budget
    assert time_to(curve, 0.99) == 30.0 and time_to(curve, 0.98) == 10.0
    assert time_to(curve, 0.995) is None and time_to(curve, None) is None
    assert best_trial(TRIALS, 60).number == 3  # of two at 0.991, the first to complete
    assert best_trial(TRIALS, 80).number == 6 and best_trial(TRIALS, 5) is None
    assert counts(TRIALS, 60) == {"complete": 4, "pruned": 1, "other": 4}


def epochs(*accs, start=0.0, each=10.0, model_s=8.0):
    return tuple(Epoch(i + 1, start + (i + 1) * each, acc, model_s) for i, acc in enumerate(accs))


def test_an_upstream_trial_is_found_by_its_params_and_value():
    params = {"model.dropout": "0.25", "optimizer.lr": "0.0123", "trainer.epochs": "2"}
    runs = [Run("a", "FINISHED", params, epochs(0.97, 0.985), 0.986),
            Run("b", "FINISHED", params | {"optimizer.lr": "0.05"}, epochs(0.97, 0.990), 0.991),
            Run("c", "FINISHED", params | {"optimizer.lr": "0.05"}, epochs(0.97, 0.993), 0.994)]
    # upstream: no run id; `optimizer` is a group choice, no param of the run, so it is not compared
    trial = Trial(3, "COMPLETE", 0.990, 50.0, {"model.dropout": 0.25, "optimizer.lr": 0.05, "optimizer": "adamw"})
    assert matching_run(trial, runs).run_id == "b"
    assert matching_run(Trial(4, "COMPLETE", 0.990, 50.0, {"optimizer.lr": 0.0123}), runs) is None  # other value
    # ours: the trial names its run
    assert matching_run(Trial(5, "COMPLETE", 0.985, 50.0, {"optimizer.lr": 0.05}, run_id="c"), runs).run_id == "c"


def test_epochs_and_the_share_of_wall_time_not_spent_training():
    runs = [Run("a", "FINISHED", {"trainer.epochs": "4"}, epochs(0.9, 0.95, 0.97, 0.98), None),  # complete
            Run("b", "FINISHED", {"trainer.epochs": "4"}, epochs(0.5, start=40.0), None),  # pruned after 1 of 4
            Run("c", "KILLED", {"trainer.epochs": "4"}, epochs(0.9, 0.95, start=50.0), None)]  # stopped at 65 s
    assert trial_epochs(runs, budget=65) == 4 + 1 + 1  # c's 2nd epoch (70 s) is after the budget
    assert model_seconds(runs, 65) == pytest.approx(6 * 8.0)
    assert not_training_share(48.0, wall_s=60.0, parallel=2) == pytest.approx(1 - 48 / 120)
    assert not_training_share(0.0, 0.0, 1) is None
    assert unpruned_share(runs, 65) == pytest.approx(5 / 8)  # a and b; c was cut by the budget, not pruned
    assert unpruned_share(runs[2:], 65) is None


def study_run(study, seed, curve, test_acc=0.99, epochs_=10, not_training=0.05, failed=None):
    return StudyRun(study, seed, [], "2026-01-01T00:00:00", 100.0, 100.0, 143, True, failed, 2, curve,
                    curve[-1][1] if curve else None, test_acc if curve else None, 0 if curve else None,
                    {"complete": len(curve), "pruned": 1, "other": 0}, epochs_, 50.0, not_training, 0.3)


def test_summary_races_each_seed_to_upstreams_best_of_the_same_seed():
    runs = [study_run("ours", 0, [(10, 0.985), (20, 0.991)]), study_run("ours", 1, [(15, 0.993)]),
            study_run("upstream", 0, [(30, 0.980), (60, 0.990)]), study_run("upstream", 1, [(80, 0.994)]),
            study_run("random", 0, [(50, 0.970)]), study_run("random", 1, [], failed="exit code 2: error: x")]
    rows = {r["study"]: r for r in summarize(runs, [0.99, 0.993])}
    ours = rows["ours"]
    assert ours["final_best"][0] == pytest.approx(0.992) and ours["seeds"] == 2
    # seed 0 reaches upstream's 0.990 at 20 s; seed 1 never reaches upstream's 0.994
    assert ours["to_reference"] == {"mean_std": (20, 0.0), "reached": 1, "seeds": 2}
    assert ours["to_target"]["0.990"]["mean_std"] == (17.5, pytest.approx(3.5355, rel=1e-3))
    assert rows["upstream"]["to_reference"]["mean_std"][0] == 70  # its own best, when it got there
    assert rows["random"]["seeds"] == 1 and rows["random"]["failed"] == 1
    assert rows["random"]["to_reference"]["reached"] == 0
    table = markdown_table(list(rows.values()), [0.99, 0.993])
    assert "| ours | 2 | 99.20 ± 0.14 | 99.00 | 20 (1/2) | 18 ± 4 | 15 (1/2) | 10 | 1.5 / 1 / 0 | 5.0% | 30% |" in table
    assert "| random | 1 (1 failed) | 97.00 | 99.00 | not reached | not reached |" in table
    assert "| upstream | 2 |" in table and table.count("\n") == 4


def test_the_seed_band_is_a_mean_where_every_seed_has_a_value():
    times, mean, low, high = seed_band([[(10, 0.98), (30, 0.99)], [(20, 0.97)]], budget=40)
    assert times == [0.0, 10, 20, 30, 40]
    assert math.isnan(mean[0]) and math.isnan(mean[1]) and math.isnan(low[0])
    assert mean[2:] == pytest.approx([0.975, 0.98, 0.98]) and low[1] == high[1] == 0.98
    assert (low[3], high[3]) == (0.97, 0.99)


def test_upstream_gets_the_space_as_command_line_sweeps_with_our_parallelism():
    params = {"model.dropout": "interval(0.1, 0.6)", "optimizer.lr": "tag(log, interval(1e-4, 3e-1))",
              "trainer.epochs": "choice(1, 2)", "model.batch_norm": "true"}
    up = study_overrides("upstream", params, n_jobs=2, max_failure_rate=0.5, seed=3, cores=8, user=["data.root=/d"])
    assert up[:3] == ["hydra/sweeper=optuna", "hparams_search=none", "hydra/launcher=joblib"]
    assert {"hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=3", "trainer.threads=4",
            "hydra.sweeper.direction=maximize", "model.dropout=interval(0.1, 0.6)", "model.batch_norm=true",
            "optimizer.lr=tag(log, interval(1e-4, 3e-1))", "trainer.epochs=choice(1, 2)"} <= set(up)
    assert not any("pruner" in o for o in up) and "hydra/sweeper/sampler=random" not in up
    # what the user fixes leaves the space, as our sweeper does it; their threads stay theirs
    rnd = study_overrides("random", params, 2, 0.5, 3, 8, user=["model=small", "trainer.threads=1"])
    assert "hydra/sweeper/sampler=random" in rnd and not any(o.startswith(("model.", "trainer.threads")) for o in rnd)
    assert study_overrides("ours", params, 2, 0.5, 3, 8, []) == ["hydra.sweeper.sampler.seed=3"]
    assert "hydra/sweeper/pruner=none" in study_overrides("ours_nopruning", params, 2, 0.5, 3, 8, [])


def test_the_shipped_space_is_read_as_overrides_upstream_accepts():
    space = compose_sweep([])
    assert space.params and space.n_jobs >= 1 and space.optimized_metric == ("val/acc",)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in space.params.items()])
    assert any(o.is_sweep_override() for o in parsed)
    assert [override_text(v) for v in (True, None, 3, 0.5, "adamw", "a b", "choice(1, 2)")] == \
        ["true", "null", "3", "0.5", "adamw", "'a b'", "choice(1, 2)"]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's end is reaped by PID 1, which in some containers never does it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_study_is_stopped_at_the_budget_with_its_whole_process_group(tmp_path):
    child = tmp_path / "child.pid"
    # the study's process starts a worker of its own (as joblib does), then both outlive the budget
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.time()
    ran = run_until([sys.executable, "-c", code], tmp_path, budget=2, grace=5, env=dict(os.environ))
    assert ran.stopped_at_budget and ran.exit_code == -15 and time.time() - start < 10
    time.sleep(0.2)
    assert not running(int(child.read_text()))
    assert not failed_at_once(ran, [])


def test_a_study_that_fails_at_once_is_named_by_its_error_line(tmp_path):
    code = "import sys; print('starting'); print('error: data.root=/x holds no MNIST'); sys.exit(2)"
    ran = run_until([sys.executable, "-c", code], tmp_path, budget=30, grace=5, env=dict(os.environ))
    assert ran.exit_code == 2 and not ran.stopped_at_budget and ran.ended - ran.started < 10
    assert failed_at_once(ran, []) and not failed_at_once(ran, [Trial(0, "COMPLETE", 0.9, 5.0)])
    assert failure_line(tmp_path / "sweep.log") == "error: data.root=/x holds no MNIST"


def test_the_bench_goes_on_after_a_study_that_fails_at_once(tmp_path, capsys, monkeypatch):
    def fake_run(cmd, folder, budget, grace, env):  # upstream fails at once, ours runs to the budget
        failing = "hydra/sweeper=optuna" in cmd
        (folder / "sweep.log").write_text("starting\nerror: hydra/sweeper=optuna not found\n" if failing else "")
        return Ran(100.0, 101.0 if failing else 130.0, 2 if failing else 143, not failing)

    monkeypatch.setattr(sweepbench, "run_until", fake_run)
    monkeypatch.setattr(sweepbench, "empty_mlflow_store", lambda path: path.touch() or path)
    monkeypatch.setattr(sweepbench, "read_runs", lambda database, experiment, started: [])
    out = tmp_path / "out"
    assert main(["--studies", "upstream", "ours", "--sweep-seeds", "0", "--budget", "30", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"error: study upstream (seed 0) failed at once, exit code 2: error: hydra/sweeper=optuna not found; "
            f"its log: {out / 'upstream-s0' / 'sweep.log'}") in err
    rows = {r["study"]: r for r in json.loads((out / "sweepbench.json").read_text())["summary"]}
    assert rows["upstream"]["failed"] == 1 and rows["ours"]["seeds"] == 1 and rows["ours"]["to_reference"] is None
    assert "| upstream | 0 (1 failed) |" in (out / "sweepbench.md").read_text()


def test_keep_rereads_earlier_studies_of_the_same_budget_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    started = []

    def fake_run(cmd, folder, budget, grace, env):
        started.append(folder.name)
        return Ran(100.0 + len(started), 130.0, 143, True)

    monkeypatch.setattr(sweepbench, "run_until", fake_run)
    monkeypatch.setattr(sweepbench, "empty_mlflow_store", lambda path: path.touch() or path)
    monkeypatch.setattr(sweepbench, "read_runs", lambda database, experiment, started: [])
    out = tmp_path / "out"
    args = ["--studies", "ours", "--budget", "30", "--out", str(out)]
    assert main([*args, "--sweep-seeds", "0"]) == 0
    assert main([*args, "--sweep-seeds", "0", "1", "--keep"]) == 0  # seed 0 kept, seed 1 run
    assert main(["--studies", "ours", "--budget", "40", "--out", str(out), "--sweep-seeds", "0", "--keep"]) == 0
    assert started == ["ours-s0", "ours-s1", "ours-s0"]  # another budget is another measurement: run again
    assert "ours-s0: kept from" in capsys.readouterr().err
    runs = json.loads((out / "sweepbench.json").read_text())["runs"]
    assert [r["wall_seconds"] for r in runs] == [27.0]  # the rerun's own clock: started at 103, ended at 130


def test_sigterm_to_the_bench_stops_the_running_study(tmp_path, capsys, monkeypatch):
    import signal

    stopped = []

    def study_until_sigterm(cmd, folder, budget, grace, env):  # run_until's finally stops the study's group
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            stopped.append(folder.name)
        return Ran(0.0, 5.0, 0, False)

    monkeypatch.setattr(sweepbench, "run_until", study_until_sigterm)
    monkeypatch.setattr(sweepbench, "empty_mlflow_store", lambda path: path.touch() or path)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--studies", "ours", "upstream", "--sweep-seeds", "0", "--out", str(tmp_path / "out")]) == 143
    assert stopped == ["ours-s0"] and signal.getsignal(signal.SIGTERM) is before  # no next study, handler back
    assert "terminated (SIGTERM): the running study was stopped" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--studies", "ours", "turbo"], "error: --studies ours turbo: unknown turbo; allowed: ours, upstream, random, "
                                     "ours_nopruning, optuna, ray"),
    (["--budget", "0.5"], "error: --budget=0.5 must be >= 1 (wall-clock seconds per study)"),
    (["--targets", "99"], "error: --targets 99.0: a target is a val/acc in (0, 1], e.g. 0.99"),
    (["model=huge"], "error: overrides model=huge: In 'config': Could not find 'model/huge'"),
])
def test_bad_arguments_are_one_line_before_any_study_runs(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == message and not (tmp_path / "out").exists()


def test_a_folder_the_bench_did_not_make_is_refused(tmp_path, capsys):
    (tmp_path / "ours-s0").mkdir()
    assert main(["--studies", "ours", "--sweep-seeds", "0", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'ours-s0'} exists and was not made by sweepbench" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_sweep_benchmark_runs_three_kinds_of_study_end_to_end(tmp_path, mnist_root):
    """Our sweeper, upstream's through joblib, and the bare Optuna loop: each a different way to run and read a
    study (the random study is ours with another sampler; the Ray study is tests/test_peers.py's)."""
    out = tmp_path / "sb"
    proc = run_cli(["--quick", "--studies", "ours", "upstream", "optuna", f"--out={out}", *FAST,
                    f"data.root={mnist_root}"], cwd=tmp_path, module="mnist_sweep.sweepbench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "sweepbench.json").read_text())
    runs = {r["study"]: r for r in results["runs"]}
    assert set(runs) == {"ours", "upstream", "optuna"} and results["budget_s"] == 25
    for r in runs.values():
        assert r["failed"] is None and 0 < r["wall_seconds"] <= 25 and r["started"]
        assert set(r["trials"]) == {"complete", "pruned", "other"} and r["trial_epochs"] >= 0
        assert 0.0 <= r["not_training"] <= 1.0
        if r["trials"]["complete"]:  # the joblib studies' first trial waits for their worker processes
            assert 0 <= r["final_best"] <= 1 and 0 <= r["best_test_acc"] <= 1 and r["trial_epochs"] >= 1
    ours = runs["ours"]
    assert ours["trials"]["complete"] >= 1 and ours["curve"][-1][1] == ours["final_best"]
    assert 0 < ours["unpruned_share"] <= 1 and ours["parallel"] >= 1
    assert "hydra/sweeper=optuna" in runs["upstream"]["command"]
    optuna = runs["optuna"]  # the bare loop: its trials come from its epoch log, numbered by Optuna
    assert optuna["trials"]["complete"] >= 1 and optuna["command"][1:4] == ["-m", "mnist_sweep.peers", "optuna"]
    table = (out / "sweepbench.md").read_text()
    assert all(f"| {name} | 1 |" in table and f"| {name} | 1 |" in proc.stdout for name in runs)
    assert "CPU flags" in table and (out / "sweepbench.png").stat().st_size > 10_000


def test_the_rank_correlation_pools_the_full_curves_of_a_studys_seeds():
    a, b = study_run("upstream", 0, [(10, 0.98)]), study_run("upstream", 1, [(10, 0.99)])
    a.val_curves = [[0.90, 0.95, 0.97], [0.91, 0.96, 0.98], [0.92, 0.90]]  # the last was pruned: left out
    b.val_curves = [[0.93, 0.97, 0.99], [0.94, 0.94, 0.96]]
    ours = study_run("ours", 0, [(10, 0.98)])  # no curves: no row
    rows = sweepbench.summarize([a, b, ours], [0.99])
    rho = rows[0]["rank_correlation"]
    assert rho[3] == (pytest.approx(1.0), 4) and rho[1] == (pytest.approx(-0.2), 4)
    table = sweepbench.rank_table(rows)
    assert "| upstream | 4 | -0.20 |" in table and "ours" not in table
    assert sweepbench.rank_table([rows[1]]) == ""  # ours

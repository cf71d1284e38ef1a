"""The sweep benchmark's peers: their epoch log read back as trials and runs (hand-made records), what they take
from our config, and each peer study once on tiny data through the bench (ray only where it is installed)."""

import json

import pytest

from mnist_sweep import sweepbench
from mnist_sweep.epoch_log import TrialRecord, read_epoch_log, read_records, trials_and_runs
from mnist_sweep.peer_plan import ASHA, FIFO, MEDIAN_STOPPING, make_plan, ray_scheduler, trial_overrides
from mnist_sweep.sweepbench import analyse, best_trial, counts, main, matching_run, Ran
from conftest import FAST, run_cli

T0 = 1000.0  # the study's process start


def line(kind, trial, t, number=None, **fields):
    return {"kind": kind, "trial": trial, "number": number, "time": T0 + t, **fields}


def epoch(trial, t, e, acc, number=None):
    return line("epoch", trial, t, number, epoch=e, val_acc=acc, model_seconds=2.0)


RECORDS = [
    line("start", "a", 1.0, params={"optimizer.lr": 0.01}, epochs=3),
    line("start", "b", 1.5, params={"optimizer.lr": 0.03}, epochs=3),
    epoch("a", 5.0, 1, 0.90), epoch("b", 5.5, 1, 0.80),
    line("end", "b", 5.6, state="PRUNED", value=None, test_acc=None, error=None),  # ASHA stopped it at epoch 1
    epoch("a", 9.0, 2, 0.95), epoch("a", 13.0, 3, 0.97),
    line("end", "a", 14.0, state="COMPLETE", value=0.97, test_acc=0.965, error=None),
    line("start", "c", 14.5, params={"optimizer.lr": 0.02}, epochs=3), epoch("c", 18.0, 1, 0.93),  # cut off
    line("start", "d", 15.0, params={"optimizer.lr": 9.0}, epochs=3),
    line("end", "d", 16.0, state="FAIL", value=None, test_acc=None, error="DivergedError: loss nan"),
]


def test_the_epoch_log_becomes_the_benchs_trials_and_runs():
    trials, runs = trials_and_runs(RECORDS, started=T0)
    by_id = {t.run_id: t for t in trials}
    assert [t.number for t in trials] == [0, 1, 2, 3]  # Ray's ids are hashes: numbered in the order they started
    assert (by_id["a"].state, by_id["a"].value, by_id["a"].seconds) == ("COMPLETE", 0.97, 14.0)
    assert (by_id["b"].state, by_id["b"].value, by_id["b"].seconds) == ("PRUNED", None, pytest.approx(5.6))
    assert (by_id["c"].state, by_id["c"].seconds) == ("RUNNING", None)  # no end line: the budget cut it off
    assert by_id["d"].state == "FAIL" and by_id["a"].params == {"optimizer.lr": 0.01}
    assert counts(trials, budget=60) == {"complete": 1, "pruned": 1, "other": 2}
    run_of = {r.run_id: r for r in runs}
    assert set(run_of) == {"a", "b", "c"}  # d trained no epoch: no run, as read_runs has none for it
    assert [(e.step, e.seconds, e.val_acc) for e in run_of["a"].epochs] == [(1, 5.0, 0.90), (2, 9.0, 0.95),
                                                                            (3, 13.0, 0.97)]
    assert (run_of["a"].status, run_of["b"].status, run_of["c"].status) == ("FINISHED", "FINISHED", "RUNNING")
    assert run_of["a"].params == {"optimizer.lr": "0.01", "trainer.epochs": "3"} and run_of["a"].test_acc == 0.965
    best = best_trial(trials, budget=60)
    assert best.run_id == "a" and matching_run(best, runs).test_acc == 0.965


def test_a_peer_study_is_analysed_like_the_others():
    trials, runs = trials_and_runs(RECORDS, started=T0)
    result = analyse("ray", 0, [], Ran(T0, T0 + 20.0, -15, True), 20.0, 2, trials, runs, None)
    assert result.final_best == 0.97 and result.best_test_acc == 0.965 and result.curve == [(14.0, 0.97)]
    assert result.trial_epochs == 5 and result.model_seconds == pytest.approx(10.0)
    assert result.not_training == pytest.approx(1 - 10.0 / 40.0)
    assert result.unpruned_share == pytest.approx(4 / 6)  # a: 3 of 3 epochs, b: 1 of 3; c was cut by the budget


def test_optuna_numbers_are_kept_and_a_complete_trial_without_a_value_is_a_failure():
    records = [line("start", "7", 1.0, number=7, params={}, epochs=2), epoch("7", 3.0, 1, 0.91, number=7),
               epoch("7", 5.0, 2, 0.93, number=7), line("end", "7", 6.0, number=7, state="COMPLETE"),
               line("start", "8", 2.0, number=8, params={}, epochs=2), line("end", "8", 2.5, number=8,
                                                                               state="COMPLETE")]
    (seven, eight), _ = trials_and_runs(records, started=T0)
    assert (seven.number, seven.state, seven.value) == (7, "COMPLETE", 0.93)  # the value: its last val/acc
    assert (eight.number, eight.state, eight.value) == (8, "FAIL", None)


def test_records_are_appended_and_a_torn_last_line_is_skipped(tmp_path):
    log = tmp_path / "epochs.jsonl"
    rec = TrialRecord(log, "3", 3)
    rec.start({"model.dropout": 0.2}, 9)
    rec.epoch(1, {"val/acc": 0.95, "epoch_seconds": 3.0, "val_seconds": 0.5, "train/loss": 0.2})
    rec.end("PRUNED")
    with open(log, "a") as f:
        f.write('{"kind": "epoch", "trial": "4", "ti')  # SIGKILL mid-write
    assert [r["kind"] for r in read_records(log)] == ["start", "epoch", "end"]
    trials, runs = read_epoch_log(log, started=0.0)
    assert trials[0].state == "PRUNED" and runs[0].epochs[0].model_seconds == 3.5
    assert read_epoch_log(tmp_path / "missing.jsonl", 0.0) == ([], [])
    with pytest.raises(ValueError):
        rec.end("DONE")


@pytest.mark.parametrize("pruner, expected", [
    ({"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1, "reduction_factor": 3,
      "min_early_stopping_rate": 0}, (ASHA, {"grace_period": 1, "reduction_factor": 3, "max_t": 9})),
    ({"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": "auto", "reduction_factor": 2,
      "min_early_stopping_rate": 1}, (ASHA, {"grace_period": 2, "reduction_factor": 2})),
    ({"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "max_resource": "auto",
      "reduction_factor": 3}, (ASHA, {"grace_period": 1, "reduction_factor": 3, "brackets": 1})),
    ({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 3, "n_warmup_steps": 2},
     (MEDIAN_STOPPING, {"grace_period": 2, "min_samples_required": 3})),
    ({"_target_": "optuna.pruners.NopPruner"}, (FIFO, {})),
    ({}, (FIFO, {})),
])
def test_ours_pruner_maps_to_the_nearest_ray_scheduler(pruner, expected):
    kind, kwargs = ray_scheduler(pruner, max_t=9)
    assert kind == expected[0] and expected[1].items() <= kwargs.items()


def test_the_peers_search_ours_space_with_ours_settings():
    plan = make_plan(["model=small", "data.root=/d", "hydra.sweeper.n_jobs=1"], seed=4, cores=8)
    # model=small fixes the model: its keys leave the space, as in ours
    assert set(plan.distributions) == {"optimizer.lr", "optimizer.weight_decay", "data.batch_size"}
    assert (plan.n_jobs, plan.seed, plan.n_startup_trials, plan.epochs) == (1, 4, 8, 9)
    assert plan.pruner["_target_"] == "optuna.pruners.SuccessiveHalvingPruner"
    assert {"optimizer=adamw", "scheduler=onecycle", "trainer.epochs=9", "trainer.threads=8", "model=small",
            "data.root=/d"} <= set(plan.fixed)
    assert not any(o.startswith("hydra") for o in plan.fixed)  # a peer has no Hydra sweeper to give them to
    assert trial_overrides(plan, {"optimizer.lr": 0.001, "data.batch_size": 64})[:2] == ["optimizer.lr=0.001",
                                                                                        "data.batch_size=64"]


def test_a_peer_with_bad_input_says_so_in_one_line(tmp_path, capsys):
    from mnist_sweep.peers import main as peers_main

    assert peers_main(["optuna", "--folder", str(tmp_path), "--budget", "5", "--", "model=huge"]) == 2
    assert capsys.readouterr().err.startswith("error: overrides model=huge: ")
    assert peers_main(["optuna", "--folder", str(tmp_path / "no"), "--budget", "5"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_an_interrupted_optuna_peer_stops_its_workers(tmp_path, monkeypatch):
    """Ctrl-C, or SIGTERM to the peer alone (the shell raises it as Terminated): its worker processes are stopped,
    not left to train until the budget while the peer's exit waits for them."""
    from types import SimpleNamespace

    from mnist_sweep import peer_optuna
    from mnist_sweep.errors import Terminated

    workers = []

    class Worker:  # a spawned worker, as far as run() sees it; the first join is where SIGTERM arrives
        def __init__(self, target, args, name):
            self.calls = []
            workers.append(self)

        def start(self):
            self.calls.append("start")

        def join(self):
            self.calls.append("join")
            if self.calls == ["start", "join"] and self is workers[0]:
                raise Terminated()

        def terminate(self):
            self.calls.append("terminate")

    monkeypatch.setattr(peer_optuna.multiprocessing, "get_context", lambda method: SimpleNamespace(Process=Worker))
    with pytest.raises(Terminated):
        peer_optuna.run(SimpleNamespace(n_jobs=2), tmp_path, deadline=0.0)
    assert [w.calls for w in workers] == [["start", "join", "terminate", "join"], ["start", "terminate", "join"]]


def test_ray_is_skipped_in_one_line_when_it_is_not_installed(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("ray") else
                        find_spec(name, *a))
    ran = []
    monkeypatch.setattr(sweepbench, "run_until", lambda cmd, folder, *a: ran.append(cmd) or Ran(0.0, 1.0, 0, False))
    monkeypatch.setattr(sweepbench, "empty_mlflow_store", lambda path: path.touch() or path)
    out = tmp_path / "out"
    assert main(["--studies", "optuna", "ray", "--sweep-seeds", "0", "--budget", "5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "ray: skipped: ray[tune] is not installed (pip install -e '.[bench]')\n" in err
    assert len(ran) == 1 and ran[0][1:4] == ["-m", "mnist_sweep.peers", "optuna"]
    assert main(["--studies", "ray", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --studies ray: ray: ray[tune] is not installed "
                                               "(pip install -e '.[bench]')")


@pytest.mark.slow
def test_ray_study_on_tiny_data(tmp_path, mnist_root):
    pytest.importorskip("ray.tune")
    out = tmp_path / "sb"
    # not --quick's 25 s: Ray's start-up (ray.init, then an actor per trial importing torch) takes 15-20 s of a
    # loaded 2-core machine before the first epoch
    proc = run_cli(["--budget", "50", "--grace", "15", "--sweep-seeds", "0", "--studies", "ray", f"--out={out}",
                    *FAST, "hydra.sweeper.n_jobs=2", "trainer.epochs=3", f"data.root={mnist_root}"], cwd=tmp_path,
                   module="mnist_sweep.sweepbench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((out / "sweepbench.json").read_text())["runs"]
    assert run["study"] == "ray" and run["failed"] is None and run["trials"]["complete"] >= 1, proc.stderr[-3000:]
    assert 0 <= run["final_best"] <= 1 and 0 <= run["best_test_acc"] <= 1 and run["trial_epochs"] >= 3
    assert run["parallel"] == 2 and "| ray | 1 |" in proc.stdout
    assert "ray.init: " in (out / "ray-s0" / "sweep.log").read_text()


def test_overrides_after_studies_are_overrides():
    args = sweepbench.parse_args(["--studies", "optuna", "ray", "model=small", "--out", "x", "data.root=/d"])
    sweepbench.check_args(args)
    assert args.studies == ["optuna", "ray"] and args.overrides == ["data.root=/d", "model=small"]

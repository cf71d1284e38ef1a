"""The benchmark: its arithmetic on known figures, and one quick end-to-end run of every recipe on tiny data."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mnist_sweep.bench import (
    Epoch, RecipeRun, main, markdown_table, matmul_gflops, memcpy_counts, profiled_copies, summarize)
from mnist_sweep.config import compose_spec
from mnist_sweep.train import fit, prepare
from conftest import REPO, run_cli


def run(recipe, seed, *accs, epoch_seconds=10.0):
    """A recipe run whose epochs take `epoch_seconds` and reach `accs`, after 2 s of setup."""
    epochs = [Epoch(i + 1, epoch_seconds, 1000 / epoch_seconds, 5.0, acc, 2 + (i + 1) * epoch_seconds)
              for i, acc in enumerate(accs)]
    hit = next((e for e in epochs if e.test_acc >= 0.99), None)
    return RecipeRun(recipe, seed, 2.0, epochs, hit and hit.elapsed, hit and hit.epoch * epoch_seconds,
                     warmup_seconds=0.5)


def test_summary_takes_means_over_seeds_and_ratios_against_the_classic_recipe():
    runs = [run("classic", 1, 0.98, 0.985, 0.991, epoch_seconds=100.0),
            run("speedrun", 1, 0.97, 0.991), run("speedrun", 2, 0.975, 0.993),
            run("accuracy", 1, 0.95, 0.97)]  # never reaches 99%
    rows = {r["recipe"]: r for r in summarize(runs, {"fp32": 50.0, "bf16": 10.0}, dict.fromkeys(
        ["classic", "speedrun", "accuracy"], "fp32"))}
    assert rows["classic"]["time_to_target"] == (302.0, 0.0) and rows["classic"]["epoch_speedup"] == 1.0
    sr = rows["speedrun"]
    assert sr["seeds"] == 2 and sr["epoch_speedup"] == pytest.approx(10.0)
    assert sr["time_to_target"] == (22.0, 0.0) and sr["time_to_target_ratio"] == pytest.approx(22 / 302)
    assert sr["train_to_target"] == (20.0, 0.0) and rows["classic"]["train_to_target"] == (300.0, 0.0)
    assert sr["final_test_acc"][0] == pytest.approx(0.992) and sr["final_test_acc"][1] == pytest.approx(0.0014142, rel=1e-3)
    assert sr["ceiling_fraction"] == pytest.approx(0.1)
    assert rows["accuracy"]["time_to_target"] is None and rows["accuracy"]["reached_target"] == "0/1"
    table = markdown_table(list(rows.values()), 0.99)
    assert "| speedrun | fp32 | 2 | 10.0 ± 0.0 |" in table and "1/13.7" in table and "not reached (0/1)" in table
    assert "| 20.0 ± 0.0 | 22.0 ± 0.0 | 0.50 | - |" in table  # train and cold times, warm-up, no copy count


def test_without_a_ceiling_the_fraction_is_left_out():
    rows = summarize([run("speedrun", 1, 0.991, epoch_seconds=0.05)], {}, {"speedrun": "bf16"})
    assert rows[0]["ceiling_fraction"] is None and rows[0]["train_to_target"] == (0.05, 0.0)
    assert "| 0.050 ± 0.000 |" in markdown_table(rows, 0.99)


def test_memcpy_counts_read_the_profilers_trace_by_direction():
    trace = {"traceEvents": [
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)"},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)"},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)"},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync"},  # the host's call, not a copy
        {"cat": "kernel", "name": "Memcpy HtoD lookalike"}]}
    assert memcpy_counts(trace) == {"HtoD": 1, "DtoH": 2, "DtoD": 0}
    assert memcpy_counts({}) == {"HtoD": 0, "DtoH": 0, "DtoD": 0}


def test_matmul_ceiling_is_a_positive_rate():
    assert matmul_gflops(torch.float32, torch.device("cpu"), seconds=0.01, max_n=256) > 0


def test_copies_are_counted_on_an_epoch_past_the_end_of_the_schedule(mnist_root):
    """The profiled epoch comes after the whole one-cycle schedule: it must not step the scheduler past its end."""
    spec = compose_spec(["experiment=speedrun", "trainer.epochs=1", "trainer.device=cpu", f"data.root={mnist_root}",
                         "data.download=false", "data.val_size=200", "model.conv1_channels=4",
                         "model.conv2_channels=8", "model.fc_width=16"])
    p = prepare(spec)
    fit(p)
    assert profiled_copies(p) == {"HtoD": 0, "DtoH": 0, "DtoD": 0}  # no CUDA here: no device copies to see


def test_quick_schedules_one_epoch_and_takes_overrides_after_options(tmp_path, mnist_root):
    """--quick's one epoch reaches the one-cycle schedule too: speedrun_gpu's 4-epoch schedule over one 1000-image
    batch per epoch divided by zero. Overrides may follow the options."""
    out = tmp_path / "bench"
    assert main(["--recipes=speedrun_gpu", "--quick", f"data.root={mnist_root}", "--ceiling-seconds=0",
                 f"--out={out}", "data.download=false", "data.val_size=200", "trainer.device=cpu",
                 "trainer.precision=fp32", "trainer.compile=false", "model.conv1_channels=4",
                 "model.conv2_channels=8", "model.fc_width=16"]) == 0
    row = json.loads((out / "results.json").read_text())["summary"][0]
    assert row["recipe"] == "speedrun_gpu" and row["epochs_run"] == 1 and row["ceiling_fraction"] is None


@pytest.mark.slow
def test_quick_benchmark_runs_every_recipe_end_to_end(tmp_path, mnist_root):
    out = tmp_path / "bench"
    proc = run_cli(["--quick", f"--out={out}", f"data.root={mnist_root}", "data.download=false",
                    "data.val_size=200", "trainer.device=cpu", "trainer.threads=1"], cwd=tmp_path,
                   module="mnist_sweep.bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # no outputs/configs is not available, from Hydra
    results = json.loads((out / "results.json").read_text())
    rows = {r["recipe"]: r for r in results["summary"]}
    # every recipe ran, except bf16 where this CPU would only emulate it
    assert set(rows) | set(results["skipped"]) == {"classic", "fast", "fast_bf16", "speedrun", "accuracy",
                                                   "accuracy_heldout", "speedrun_gpu"}
    assert set(results["skipped"]) <= {"fast_bf16", "speedrun_gpu"}
    for r in rows.values():
        assert r["epochs_run"] == 1 and r["epoch_seconds"][0] > 0 and 0 < r["ceiling_fraction"]
        assert 0.0 <= r["test_acc_per_epoch"][0][0] <= 1.0
    assert rows["classic"]["epoch_speedup"] == 1.0 and rows["speedrun"]["epoch_speedup"] > 0
    assert results["ceiling_gflops"]["fp32"] > 0 and results["quick"] is True
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table and f"| {name} |" in proc.stdout for name in rows)


@pytest.mark.parametrize("args, message", [
    (["--recipes=classic,turbo"], "--recipes='classic,turbo': unknown turbo; allowed: classic, fast, fast_bf16, speedrun"),
    (["--seeds=0"], "--seeds=0 and --classic-seeds=1 must be >= 1"),
    (["model=huge"], "Could not find 'model/huge'"),
])
def test_bad_benchmark_arguments_fail_early_with_one_line(tmp_path, args, message):
    proc = run_cli(["--quick", *args], cwd=tmp_path, module="mnist_sweep.bench")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


# What the GPU machine lacks: importing any of these fails, and no package declares Hydra plugins
WITHOUT_SWEEP_PACKAGES = """
import importlib.abc, importlib.metadata as md, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("optuna", "mlflow", "sqlalchemy") or (
                name.startswith("hydra_plugins.") and not name.startswith("hydra_plugins.hydra_optuna_pruning_sweeper")):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Missing())
entry_points = md.entry_points
md.entry_points = lambda **kw: md.EntryPoints([]) if kw.get("group") == "hydra.plugins" else entry_points(**kw)
"""


@pytest.mark.slow
def test_the_bench_composes_without_optuna_mlflow_or_hydra_plugins(tmp_path):
    """The GPU machine has torch, Hydra and OmegaConf only, and this checkout (the sweeper plugin's source folder on
    PYTHONPATH): the bench's compose must not load the Optuna sweeper's settings (a single run needs no sweeper),
    nor import Optuna, SQLAlchemy or MLflow. The app's errors come from the plugin's package, whose import is
    light."""
    (tmp_path / "sitecustomize.py").write_text(WITHOUT_SWEEP_PACKAGES)
    code = ("import sys; from mnist_sweep.config import compose_spec; spec = compose_spec(['experiment=speedrun_gpu']); "
            "print(spec.trainer.compile_mode, [m for m in sys.modules if m.split('.')[0] in "
            "('optuna', 'mlflow', 'sqlalchemy')])")
    path = os.pathsep.join(map(str, (tmp_path, REPO, REPO / "plugins" / "hydra_optuna_pruning_sweeper")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0 and proc.stdout.split() == ["reduce-overhead", "[]"], proc.stderr[-2000:]

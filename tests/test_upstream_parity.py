"""`hydra/sweeper=optuna_pruning` against the upstream hydra-optuna-sweeper on the same app. Here, not beside the
plugin: this is the environment that has upstream installed (mnist_sweep's sweep benchmark runs it); the plugin's
own tests run without it, where its own sampler configs are the ones Hydra finds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

pytestmark = pytest.mark.slow

SPHERE = '''
import hydra


@hydra.main(config_path=".", config_name="config")
def sphere(cfg):
    return (cfg.x - 1) ** 2 + cfg.y ** 2


if __name__ == "__main__":
    sphere()
'''


def sphere_app(folder: Path, sweeper: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(SPHERE)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "defaults": [{"override hydra/sweeper": sweeper}, "_self_"], "x": 1, "y": 1,
        "hydra": {"sweeper": {"sampler": {"seed": 123}, "direction": "minimize", "study_name": "s",
                              "storage": f"sqlite:///{folder / 'optuna.db'}", "n_trials": 8, "n_jobs": 1,
                              "params": {"x": "range(-5.5, 5.5, step=0.5)", "y": "choice(-5, 0, 5)"}},
                  "sweep": {"dir": str(folder / "multirun")}, "job": {"chdir": False}}}))
    return folder


def test_the_sphere_gives_the_same_trials_as_the_upstream_plugin(tmp_path):
    ours, upstream = sphere_app(tmp_path / "ours", "optuna_pruning"), sphere_app(tmp_path / "upstream", "optuna")
    for folder in (ours, upstream):
        result = subprocess.run([sys.executable, "app.py", "--multirun"], cwd=folder, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    mine, theirs = [optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'optuna.db'}").trials
                    for folder in (ours, upstream)]
    assert len(mine) == len(theirs) == 8
    assert [t.params for t in mine] == [t.params for t in theirs]  # TPE, seed 123: the same proposals
    assert [t.value for t in mine] == [t.value for t in theirs]
    for folder in (ours, upstream):  # the same results file, as upstream writes it
        best = yaml.safe_load((folder / "multirun" / "optimization_results.yaml").read_text())
        assert best["best_value"] == min(t.value for t in mine)
    assert (ours / "multirun" / "optimization_results.yaml").read_text() == \
        (upstream / "multirun" / "optimization_results.yaml").read_text()

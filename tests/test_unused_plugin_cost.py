"""Installing mnist_sweep (and with it the sweeper plugin) costs a Hydra app that never sweeps with it nothing:
Hydra imports every installed plugin when it starts, and this one's facade must not pull in torch, Optuna,
SQLAlchemy, MLflow or mnist_sweep, nor change a warning filter for the whole process (issue 22, item 2). The
start-up time itself is measured, not tested: plugins/hydra_optuna_pruning_sweeper/benchmarks/startup.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "optuna", "sqlalchemy", "mlflow", "mnist_sweep")
PLUGIN = "hydra_plugins.hydra_optuna_pruning_sweeper"

PLAIN_APP = f'''
import json, sys, warnings
import hydra

@hydra.main(config_path=None)
def main(cfg):
    print(json.dumps({{"modules": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m.startswith({PLUGIN!r})),
                      "filters": [repr(f) for f in warnings.filters]}}))

if __name__ == "__main__":
    main()
'''


def test_a_plain_hydra_app_imports_nothing_heavy_from_the_installed_plugin(tmp_path):
    (tmp_path / "app.py").write_text(PLAIN_APP)
    result = subprocess.run([sys.executable, "app.py", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    modules = seen["modules"]
    assert f"{PLUGIN}.optuna_pruning_sweeper" in modules  # the plugin is installed and Hydra did load it...
    assert not [m for m in modules if m.split(".")[0] in HEAVY], modules  # ...and it brought nothing heavy
    assert f"{PLUGIN}._sweeper" not in modules  # the implementation waits for a sweep that uses it
    assert not [f for f in seen["filters"] if "optuna" in f.lower() or "Heartbeat" in f], seen["filters"]
    # upstream's hydra-optuna-sweeper is installed here too: the samplers' configs are registered once, without
    # Hydra's collision warning (an error in Hydra 1.5)
    assert "already registered" not in result.stderr, result.stderr[-3000:]

#!/usr/bin/env bash
# Create .venv and install mnist_sweep and its sweeper plugin with their test dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: pip takes these builds from the local disk where a machine has them
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
# the sweeper plugin (its own distribution, plugins/) and the app that depends on it, both editable
.venv/bin/pip install --quiet --disable-pip-version-check -e 'plugins/hydra_optuna_pruning_sweeper[test]' -e '.[test]'

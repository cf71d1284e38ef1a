#!/usr/bin/env bash
# The tests, in two environments (2 processes each; run scripts/setup.sh first):
#  1. the sweeper plugin's own tests in .venv-plugin, which holds the plugin installed as its wheel (not editable:
#     what is tested is what the wheel ships), its [test,mlflow,postgres] extras and nothing of this app: no torch, no
#     mnist_sweep, so a dependency the plugin does not declare fails here;
#  2. the app's tests in .venv.
# Extra arguments go to both pytest runs (e.g. -m "not slow"). Exits non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PLUGIN=plugins/hydra_optuna_pruning_sweeper
PIP=(.venv-plugin/bin/python -m pip install --quiet --disable-pip-version-check)
PYTHON="${PYTHON:-python3}"
set -e
[ -x .venv-plugin/bin/python ] || "$PYTHON" -m venv .venv-plugin
rm -rf "$PLUGIN/build"  # setuptools builds in-tree: a module deleted from the source would linger in build/lib
"${PIP[@]}" "$PLUGIN[test,mlflow,postgres]"
"${PIP[@]}" --no-deps --force-reinstall "$PLUGIN"  # this checkout's plugin, even at an unchanged version
rm -rf "$PLUGIN/build"
# From the tests folder with -P: neither the checkout's root (mnist_sweep) nor the plugin's source folder is on
# sys.path, so the imports below and in the tests find only what .venv-plugin has installed
cd "$PLUGIN/tests"
../../../.venv-plugin/bin/python -P -c '
import importlib.util, sys
leaked = [m for m in ("torch", "mnist_sweep") if importlib.util.find_spec(m)]
plugin = importlib.util.find_spec("hydra_plugins.hydra_optuna_pruning_sweeper").origin
if leaked or "site-packages" not in plugin:
    sys.exit(f".venv-plugin must hold the installed plugin and neither torch nor mnist_sweep: has {leaked}, "
             f"plugin from {plugin}")'
set +e
../../../.venv-plugin/bin/python -P -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=10 "$@" .
plugin_status=$?
cd ../../..
.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
app_status=$?
[ "$plugin_status" = 0 ] || { echo "the plugin's tests failed (exit $plugin_status)" >&2; exit "$plugin_status"; }
exit "$app_status"

"""The program as users get it: the help page, bash tab completion, and a wheel installed away from the checkout
(its config is the copy shipped as mnist_sweep.conf), run with `python -m` and through the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_sweep.__main__ import cli

REPO = Path(__file__).resolve().parent.parent


def run_in_process(monkeypatch, capsys, *args: str, program: str = "mnist-sweep") -> str:
    """`mnist-sweep ARGS` in this process (no interpreter start-up); returns what it printed."""
    monkeypatch.setattr(sys, "argv", [program, *args])
    try:
        cli()
    except SystemExit as e:  # --help ends with exit 0
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_help_names_the_project_and_shows_examples(monkeypatch, capsys):
    out = run_in_process(monkeypatch, capsys, "--help")
    assert out.startswith("mnist-sweep: train and sweep a CNN on MNIST")
    assert "  mnist-sweep model=wide optimizer=adamw trainer.epochs=3" in out
    assert "model: deep, default, small, wide" in out and "optimizer: adadelta, adamw, sgd" in out  # the groups
    assert "\nmodel:\n  conv1_channels: 32" in out  # the config
    assert "$MNIST_ROOT" in out and 'eval "$(mnist-sweep -sc install=bash)"' in out  # $$ came out as $
    assert "powered by Hydra" not in out and "__main__" not in out


def test_cfg_job_prints_the_composed_config(monkeypatch, capsys):
    assert "model:\n  conv1_channels: 64" in run_in_process(monkeypatch, capsys, "--cfg", "job", "model=wide")


def test_tab_completion_offers_groups_and_options(monkeypatch, capsys):
    """What Hydra's bash function asks the program: COMP_LINE/COMP_POINT in the environment, `-sc query=bash`."""
    def complete(line: str) -> list[str]:
        monkeypatch.setenv("COMP_LINE", line)
        monkeypatch.setenv("COMP_POINT", str(len(line)))
        return run_in_process(monkeypatch, capsys, "-sc", "query=bash").split()

    assert "model=" in complete("mnist-sweep mo")
    assert complete("mnist-sweep trainer.epochs=2 model=") == ["model=deep", "model=default", "model=small",
                                                                 "model=wide"]


@pytest.mark.parametrize("program", ["/venv/bin/mnist-sweep", str(REPO / "mnist_sweep" / "__main__.py")],
                         ids=["console script", "python -m"])
def test_the_completion_script_completes_the_console_script(monkeypatch, capsys, program):
    """Hydra registers its bash function for argv[0]; under `python -m` that was `python` (every python command,
    and `python -m` is never completed), now it is the console script in both cases."""
    script = run_in_process(monkeypatch, capsys, "-sc", "install=bash", program=program)
    assert script.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion mnist-sweep")


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built once per session from a copy of its sources (so no build/ lands in the
    checkout) and installed with --target into a folder of its own; returns that folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("mnist_sweep", "conf"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                   check=True, env=env, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("mnist_sweep-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel)],
                   check=True, env=env, capture_output=True, timeout=300)
    return root / "site"


def run_installed(command: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """COMMAND in `cwd` with only the installed wheel on PYTHONPATH (not this checkout) and its scripts first on PATH."""
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_wheel_runs_outside_the_checkout(installed_wheel, tmp_path):
    """`python -m mnist_sweep --cfg all` away from the checkout composes the packaged config, and still finds the
    experiments a sweep wrote under outputs/configs of the working directory (hydra.searchpath)."""
    experiment = tmp_path / "outputs" / "configs" / "experiment" / "s_best.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\nmodel:\n  dropout: 0.123\n")
    proc = run_installed([sys.executable, "-m", "mnist_sweep", "--cfg", "all", "experiment=s_best"],
                         installed_wheel, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- path: mnist_sweep.conf\n      schema: pkg\n      provider: main" in proc.stdout  # the wheel's copy
    assert "\nmodel:\n  conv1_channels: 32" in proc.stdout and "  dropout: 0.123" in proc.stdout


@pytest.mark.slow
def test_the_installed_console_script_prints_the_help(installed_wheel, tmp_path):
    proc = run_installed([str(installed_wheel / "bin" / "mnist-sweep"), "--help"], installed_wheel, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("mnist-sweep: train and sweep a CNN on MNIST")
    assert "  mnist-sweep experiment=speedrun" in proc.stdout and "model: deep, default, small, wide" in proc.stdout


@pytest.mark.slow
def test_bash_completes_the_installed_console_script(installed_wheel, tmp_path, monkeypatch, capsys):
    """`eval "$(mnist-sweep -sc install=bash)"` (made in-process here), then `mnist-sweep mo<TAB>` as bash does
    it: the function runs the installed script with COMP_LINE and fills COMPREPLY."""
    script = run_in_process(monkeypatch, capsys, "-sc", "install=bash")
    tab = ('COMP_LINE="mnist-sweep mo"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(mnist-sweep mo); COMP_CWORD=1\n'
           'hydra_bash_completion; echo "${COMPREPLY[@]}"\n')
    proc = run_installed(["bash", "-c", script + tab], installed_wheel, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model=" in proc.stdout.split()

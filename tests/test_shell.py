"""The shell every `python -m mnist_sweep...` command runs in (mnist_sweep/shell.py): one masked `error:` line and
exit 2, 130 on Ctrl-C, 143 on SIGTERM, and the defaults the commands share."""

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
import yaml
from PIL import Image

from conftest import REPO, cli_args, run_cli
from mnist_sweep import shell
from mnist_sweep.errors import ConfigError, StopSweep, Terminated, UserError

SECRET = "s3cret-Hunter2"
URI = f"http://user:{SECRET}@127.0.0.1:9"  # nothing listens on port 9 (discard): refused at once
MASKED = "http://user:***@127.0.0.1:9"
# every `python -m mnist_sweep.<name>` command: the module's main goes through the shell
COMMANDS = ("report", "predict", "replay", "bench", "sweepbench", "fidelity", "startup", "workercurve", "peers",
            "overhead")


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def raising(e: BaseException):
    def main(argv=None) -> int:
        raise e
    return shell.command(stopped="nothing was written")(main)


# -- the shell itself ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [UserError, ConfigError, StopSweep])
def test_a_user_error_is_one_masked_line_and_exit_2(capsys, error):
    assert raising(error(f"--tracking-uri {URI}: cannot be reached"))([]) == 2
    assert error_lines(capsys) == [f"error: --tracking-uri {MASKED}: cannot be reached"]


@pytest.mark.parametrize("e, code, line", [(KeyboardInterrupt(), 130, "interrupted: nothing was written"),
                                           (Terminated(), 143, "terminated (SIGTERM): nothing was written")])
def test_ctrl_c_and_sigterm_are_one_line_and_their_exit_codes(capsys, e, code, line):
    assert raising(e)([]) == code
    assert error_lines(capsys) == [line]


def test_any_other_exception_is_a_bug_and_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        raising(ZeroDivisionError("a bug"))([])


def test_sigterm_raises_terminated_inside_a_command_only():
    seen = []
    before = signal.getsignal(signal.SIGTERM)

    @shell.command(stopped="x")
    def main(argv=None) -> int:
        seen.append(signal.getsignal(signal.SIGTERM))
        return 7

    assert main([]) == 7 and seen == [shell.raise_terminated]
    assert signal.getsignal(signal.SIGTERM) is before  # pytest's own handler again


def test_sigterm_to_a_command_process_exits_143_with_one_line(tmp_path):
    code = textwrap.dedent("""
        import os, signal, sys, time
        from mnist_sweep import shell

        @shell.command(stopped="the study was stopped")
        def main(argv=None):
            print("ready", flush=True)
            time.sleep(60)
            return 0

        sys.exit(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and err.strip().splitlines() == ["terminated (SIGTERM): the study was stopped"]


def test_the_shared_defaults_are_the_apps_own():
    """conf/ keeps its own copies (a YAML file cannot import a constant): they must say the same."""
    config = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    storage = yaml.safe_load((REPO / "conf" / "storage" / "sqlite.yaml").read_text())
    assert config["mlflow"]["tracking_uri"] == shell.DEFAULT_TRACKING_URI
    assert storage["url"] == shell.DEFAULT_STORAGE


# -- every command goes through it -----------------------------------------------------------------------------------

def failing_parse_args(e: BaseException):
    def parse_args(argv):
        raise e
    return parse_args


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_says_a_user_error_in_one_masked_line(name, monkeypatch, capsys):
    module = importlib.import_module(f"mnist_sweep.{name}")
    monkeypatch.setattr(module, "parse_args", failing_parse_args(UserError(f"--tracking-uri {URI}: refused")))
    assert module.main([]) == 2
    assert error_lines(capsys) == [f"error: --tracking-uri {MASKED}: refused"]


def sigterm_to_self(argv):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises Terminated well before


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_exits_130_on_ctrl_c_and_143_on_sigterm(name, monkeypatch, capsys):
    module = importlib.import_module(f"mnist_sweep.{name}")
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(module, "parse_args", failing_parse_args(KeyboardInterrupt()))
    assert module.main([]) == 130
    (line,) = error_lines(capsys)
    assert line.startswith("interrupted: ")
    monkeypatch.setattr(module, "parse_args", sigterm_to_self)
    assert module.main([]) == 143
    assert error_lines(capsys) == [line.replace("interrupted", "terminated (SIGTERM)")]  # the same words
    assert signal.getsignal(signal.SIGTERM) is before


# -- a password in a command's real arguments ------------------------------------------------------------------------

def assert_one_masked_line(capsys, start: str) -> None:
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith(start) and MASKED in line and SECRET not in err, line


def test_report_masks_the_tracking_uri(tmp_path, capsys):
    from mnist_sweep import report

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage)
    assert report.main(["--storage", storage, "--study", "s", "--tracking-uri", URI, "--no-model",
                        "--out", str(tmp_path / "out")]) == 2
    assert_one_masked_line(capsys, f"error: MLflow tracking server '{MASKED}' (--tracking-uri) cannot be reached")


def test_predict_masks_the_tracking_uri(tmp_path, capsys):
    from mnist_sweep import predict

    bar = Image.new("L", (28, 28))
    bar.paste(230, (12, 4, 16, 24))  # a bright upright bar: a '1' on black
    bar.save(tmp_path / "one.png")
    assert predict.main([str(tmp_path / "one.png"), "--run-id", "abc", "--tracking-uri", URI]) == 2
    assert_one_masked_line(capsys, f"error: MLflow tracking server '{MASKED}' (--tracking-uri) cannot be reached")


def test_replay_masks_the_tracking_uri(capsys):
    from mnist_sweep import replay

    assert replay.main(["abc", "--tracking-uri", URI]) == 2
    assert_one_masked_line(capsys, f"error: MLflow tracking server '{MASKED}' (--tracking-uri) cannot be reached")


@pytest.mark.parametrize("argv, start", [
    (["--recipes", URI], f"error: --recipes='{MASKED}': unknown {MASKED}; allowed: classic"),
    (["--recipes", "classic", f"model={URI}"], "error: overrides data.loader=classic"),
])
def test_bench_masks_its_arguments(argv, start, capsys):
    from mnist_sweep import bench

    assert bench.main(argv) == 2
    assert_one_masked_line(capsys, start)


def test_sweepbench_masks_its_arguments(tmp_path, capsys):
    from mnist_sweep import sweepbench

    assert sweepbench.main(["--studies", URI, "--out", str(tmp_path / "out")]) == 2
    assert_one_masked_line(capsys, f"error: --studies {MASKED}: unknown {MASKED}; allowed: ours")


def test_peers_mask_their_overrides(tmp_path, capsys):
    from mnist_sweep import peers

    assert peers.main(["optuna", "--folder", str(tmp_path), "--budget", "5", "--", f"model={URI}"]) == 2
    assert_one_masked_line(capsys, f"error: overrides model={MASKED}: In 'config': Could not find")


def test_startup_masks_its_arguments(capsys):
    from mnist_sweep import startup

    assert startup.main(["--source", URI, "data.root=/nowhere"]) == 2
    assert_one_masked_line(capsys, f"error: --source {MASKED}: no checkout of mnist_sweep there")


@pytest.mark.slow
def test_the_hydra_command_masks_a_password_resolved_at_run_time(tmp_path, mnist_root):
    """`python -m mnist_sweep`: a password from the environment passes the check for written-out ones and reaches
    the URL; the server cannot be reached, and the one error line shows the URL masked."""
    args = [a for a in cli_args(tmp_path, mnist_root) if not a.startswith("mlflow.tracking_uri=")]
    result = run_cli([*args, "mlflow.tracking_uri='http://user:${oc.env:MNIST_TEST_SECRET}@127.0.0.1:9'"],
                     cwd=tmp_path, env={"MNIST_TEST_SECRET": SECRET})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"error: MLflow tracking server '{MASKED}' (mlflow.tracking_uri) cannot be reached")

"""`python -m mnist_sweep`: the Hydra entry point. The only module that reads a DictConfig.

It turns the composed config into plain dataclasses (RunSpec), trains, records to MLflow and returns the
optimized metric, which is what a sweeper reads.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import tracking
from .config_types import check_fields, check_numeric_kwargs, is_number, shown
from .data import DataConfig
from .errors import ConfigError, Terminated, UserError
from .model import ModelConfig
from .redact import has_literal_password, mask_secrets
from .train import (
    RunSpec,
    TrainerConfig,
    confusion_matrix,
    evaluate,
    fit,
    objective_values,
    prepare,
)

log = logging.getLogger("mnist_sweep")
# outputs/configs (where sweeps write <study>_best experiments) is on Hydra's search path before it exists
warnings.filterwarnings("ignore", message=r".*path=outputs/configs is not available")
# Hydra builds our own callback and sweeper from _target_ without a whitelist; they are this package's code
warnings.filterwarnings("ignore", message=r".*resolved _target_='mnist_sweep\.")


def source_tree() -> Path | None:
    """The checkout this code runs from (PYTHONPATH, `python -m` in the repo, an editable install); None when it
    runs from an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file() else None


SOURCE = source_tree()
# A checkout reads its own conf/, so edits apply at once even when another copy is installed; an installed wheel
# reads the copy it ships as the package mnist_sweep.conf.
CONFIG_PATH = str(SOURCE / "conf") if SOURCE else "pkg://mnist_sweep.conf"
TRUSTED_TARGETS = ("torch.optim.*", "optuna.pruners.*")  # what a config's _target_ may name


def _section(cfg: DictConfig, key: str, cls: type) -> Any:
    """cfg[key] as the dataclass `cls`; an unknown or mistyped key names itself."""
    values = OmegaConf.to_container(cfg[key], resolve=True)
    check_fields(cls, values, key)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{key}: {e}") from None


def _factory(node: DictConfig | None, key: str):
    """A `_target_` node -> (callable building the object, interval); (None, 'epoch') when there is none."""
    if node is None or node.get("_target_") is None:
        return None, "epoch"
    kwargs = OmegaConf.to_container(node, resolve=True)
    interval = kwargs.pop("interval", "epoch")
    try:
        partial = hydra.utils.instantiate(kwargs, _execution_whitelist_=TRUSTED_TARGETS)
    except Exception as e:
        raise ConfigError(f"{key}._target_={node._target_!r} could not be built: {e}") from None
    if isinstance(partial, functools.partial):
        check_numeric_kwargs(partial.func, kwargs, key)
    lr = kwargs.get("lr")
    if key == "optimizer" and is_number(lr) and not lr > 0:  # torch takes lr=0 and trains nothing
        raise ConfigError(f"optimizer.lr={lr} must be > 0: it scales every update")
    if key == "scheduler":
        wants_steps = "steps_per_epoch" in kwargs
        return (lambda opt, steps: partial(opt, steps_per_epoch=steps) if wants_steps else partial(opt)), interval
    return partial, interval


def build_spec(cfg: DictConfig) -> RunSpec:
    """The composed config as plain, validated dataclasses; raises ConfigError naming the bad key."""
    check_mlflow_section(cfg.mlflow)
    metrics = cfg.optimized_metric
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    make_optimizer, _ = _factory(cfg.optimizer, "optimizer")
    make_scheduler, interval = _factory(cfg.get("scheduler"), "scheduler")
    return RunSpec(
        model=_section(cfg, "model", ModelConfig),
        data=_section(cfg, "data", DataConfig),
        trainer=_section(cfg, "trainer", TrainerConfig),
        make_optimizer=make_optimizer,
        make_scheduler=make_scheduler,
        scheduler_interval=interval,
        optimized_metric=metrics,
    )


def check_mlflow_section(mlflow: DictConfig) -> None:
    """What a run needs of the mlflow keys, checked before any MLflow call (an empty experiment name would
    fail only once the run is being created)."""
    for name, example in (("tracking_uri", "sqlite:///mlflow.db"), ("experiment", "mnist_sweep")):
        value = mlflow.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"mlflow.{name}={shown(value)} must be a non-empty string, e.g. "
                              f"mlflow.{name}={example}")


def compose_spec(overrides: list[str]) -> RunSpec:
    """The RunSpec that `python -m mnist_sweep OVERRIDES` would train, for entry points that are not Hydra apps."""
    from hydra import compose, initialize
    from hydra.errors import HydraException

    try:
        with initialize(config_path=CONFIG_PATH):
            cfg = compose("config", overrides=overrides)
    except HydraException as e:
        raise ConfigError(f"overrides {' '.join(overrides)}: {e}") from None
    return build_spec(cfg)


def run_tags(device: str) -> dict[str, str]:
    import torch

    tags = {"device": device, "torch": torch.__version__}
    commit = tracking.git_commit(SOURCE) if SOURCE else None  # an installed wheel has no commit of its own
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def format_epoch(epoch: int, epochs: int, m: dict[str, float]) -> str:
    return (f"epoch {epoch}/{epochs}  train/loss {m['train/loss']:.4f}  val/loss {m['val/loss']:.4f}  "
            f"val/acc {m['val/acc']:.4f}  lr {m['lr']:.3g}  {m['epoch_seconds']:.1f}s  "
            f"{m['train/images_per_s']:,.0f} img/s")


PROGRESS_EVERY_S = 30  # where stdout is no terminal (| tee, nohup, SLURM logs): a progress line this often


def progress_bar(tty: bool, epochs: int, batch_size: int):
    """Progress within an epoch: a tqdm bar on a terminal, counting images so the rate reads img/s; elsewhere a
    plain log line every PROGRESS_EVERY_S seconds, which log files keep readable."""
    if tty:
        from tqdm import tqdm

        def bar(batches, epoch):
            return tqdm(batches, total=len(batches), desc=f"epoch {epoch}/{epochs}", leave=False,
                        unit="img", unit_scale=batch_size, dynamic_ncols=True, file=sys.stdout)

        return bar

    def lines(batches, epoch):
        start = last = time.perf_counter()
        for i, batch in enumerate(batches, 1):
            yield batch
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and i < len(batches):
                last = now
                log.info(f"epoch {epoch}/{epochs}  {100 * i / len(batches):.0f}%  "
                         f"{i * batch_size / (now - start):,.0f} img/s")

    return lines


def train_and_record(cfg: DictConfig, spec: RunSpec, parent_run_id: str | None = None,
                     run_name: str | None = None, extra_tags: dict[str, str] | None = None, on_epoch_end=None,
                     on_start=None, finished_on: tuple[type, ...] = ()) -> tuple[list[float], str]:
    """Prepare (fail fast), then train inside one MLflow run; returns (objective values, run id).

    on_start(run_id) is called once the MLflow run exists; on_epoch_end(epoch, metrics) after every epoch.
    """
    prepared = prepare(spec)
    for warning in prepared.warnings:
        log.warning(warning)
    client = tracking.make_client(cfg.mlflow.tracking_uri)
    tags = run_tags(str(prepared.device)) | tracking.source_tags() | (extra_tags or {})
    with tracking.RunRecorder(client, cfg.mlflow.experiment, run_name or cfg.mlflow.run_name, parent_run_id, tags,
                              finished_on) as rec:
        # resolved, so an ${oc.env:...} password is a value here: masked before anything is stored
        rec.log_params({k: mask_secrets(str(v)) for k, v in
                        tracking.flatten(OmegaConf.to_container(cfg, resolve=True)).items()})
        tracking.log_dataset(client, rec.run_id, spec.data, prepared.splits)
        rec.log_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
        rec.log_metrics({"model/params": prepared.num_params}, step=0)
        if on_start:
            on_start(rec.run_id)

        def epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            rec.log_metrics(metrics, step=epoch)
            log.info(format_epoch(epoch, spec.trainer.epochs, metrics))
            if on_epoch_end:
                on_epoch_end(epoch, metrics)

        bar = progress_bar(sys.stdout.isatty(), spec.trainer.epochs, spec.data.batch_size)
        start = time.perf_counter()
        history = fit(prepared, epoch_end, bar)
        fit_seconds = time.perf_counter() - start
        test, pred, label = evaluate(prepared, prepared.splits.test)
        rec.log_metrics({"test/acc": test["acc"], "test/loss": test["loss"], "time/fit_seconds": fit_seconds,
                         "time/test_seconds": time.perf_counter() - start - fit_seconds}, step=spec.trainer.epochs)
        rec.log_model_weights(prepared.model, spec.model)
        rec.log_figure(tracking.confusion_figure(confusion_matrix(pred, label),
                                                 f"test set: accuracy {test['acc']:.4f}"), "confusion_matrix.png")
        values = objective_values(history, prepared.num_params, spec.optimized_metric)
        log.info(f"val/acc {history[-1]['val/acc']:.4f}  test/acc {test['acc']:.4f}  "
                 f"({', '.join(f'{n} {v:.4g}' for n, v in zip(spec.optimized_metric, values))} optimized)")
        if parent_run_id is None:  # a sweep's trials: the study's lines say where its runs are
            uri = mask_secrets(cfg.mlflow.tracking_uri)
            log.info(f"MLflow run {rec.run_id} in experiment {cfg.mlflow.experiment!r} at {uri}. "
                     f"See it with: mlflow ui --backend-store-uri {uri}  (then open "
                     f"http://127.0.0.1:5000/#/experiments/{rec.experiment_id}/runs/{rec.run_id})")
    return values, rec.run_id


def trial_hooks(cfg: DictConfig, spec: RunSpec, env: Mapping[str, str]) -> dict[str, Any]:
    """In a sweep, the job's link to its Optuna trial (found in `env`, see sweep.TrialRef): per-epoch reports
    (pruning), the MLflow nesting and the run's name."""
    from .sweep import TrialRef

    ref = TrialRef.from_env(env)
    if ref is None:
        return {}
    import optuna

    from .sweep import RUN_ID_ATTR, TrialReporter

    pruner = _factory(cfg.pruner, "pruner")[0]
    reporter = TrialReporter(ref, pruner() if pruner else None,
                             metric=spec.optimized_metric[0], multi_objective=len(spec.optimized_metric) > 1)
    return {
        "parent_run_id": ref.parent_run_id,
        "run_name": cfg.mlflow.run_name or f"trial-{ref.number}",
        "extra_tags": {"trial_number": str(ref.number), "study": ref.study},
        "on_epoch_end": reporter,
        "on_start": lambda run_id: reporter.trial.set_user_attr(RUN_ID_ATTR, run_id),
        "finished_on": (optuna.TrialPruned,),  # a pruned trial's run is complete as far as it went
    }


class OutputDirCheck(Callback):
    """Checks made before Hydra writes or prints anything (hydra.callbacks in conf/config.yaml), each one line:
    an unwritable output folder (else Hydra's traceback), and a password written out in a URL (else Hydra saves
    it in every job's .hydra/ files)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_no_literal_password(config)
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_no_literal_password(config)
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def _check_no_literal_password(config: DictConfig) -> None:
    """A password may reach a URL only at run time (${oc.env:VAR}, PGPASSWORD, ~/.pgpass), never as text."""
    tree = OmegaConf.to_container(config, resolve=False)
    for key, value in tracking.flatten(tree).items():
        if isinstance(value, str) and has_literal_password(value):
            print(f"error: {key}={mask_secrets(value)} holds a password in clear text, which would be saved in "
                  "logs, Hydra's output folders and MLflow. Leave it out of the URL and set PGPASSWORD or "
                  "~/.pgpass, or write it as ${oc.env:MY_DB_PASSWORD} and export MY_DB_PASSWORD",
                  file=sys.stderr)
            raise SystemExit(2)


def _check_writable(folder: str, key: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        print(f"error: {key}={folder} is not a writable folder ({e.strerror or e}); point it at one, e.g. "
              f"{key}=outputs/runs/today", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    try:
        spec = build_spec(cfg)
        values, _ = train_and_record(cfg, spec, **trial_hooks(cfg, spec, os.environ))
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {mask_secrets(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        terminated = isinstance(e, Terminated)
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: the MLflow run is marked KILLED",
              file=sys.stderr)
        raise SystemExit(143 if terminated else 130) from None
    return values[0] if len(values) == 1 else values


APP_NAME = "mnist-sweep"  # the console script ([project.scripts] in pyproject.toml)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def cli() -> None:
    # Hydra's bash completion registers itself for the program in argv[0]; under `python -m` that is this file,
    # which would hook every `python` command and still complete nothing. Name the console script instead.
    sys.argv[0] = APP_NAME
    # SIGTERM (kill, docker stop, SLURM, Kubernetes) ends runs and sweeps the way Ctrl-C does, not abruptly
    signal.signal(signal.SIGTERM, _terminate)
    main()


if __name__ == "__main__":
    cli()

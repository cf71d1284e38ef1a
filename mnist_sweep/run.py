"""One training run inside one MLflow run: prepare (fail fast), fit, evaluate, record. In a sweep, the same run
reports each epoch to its Optuna trial, which may prune it."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping

import optuna

from . import artifacts, machine, startup, tracking
from .config import SOURCE, Recording
from hydra_plugins.hydra_optuna_pruning_sweeper import current_trial, mask_secrets
from .train import RunSpec, confusion_matrix, evaluate, fit, objective_values, prepare

log = logging.getLogger("mnist_sweep")


def run_tags(device: str) -> dict[str, str]:
    """The run's environment (tracking.ENVIRONMENT_TAGS), read once the run is prepared (its thread count set)."""
    import torch

    tags = {tracking.DEVICE_TAG: device, tracking.THREADS_TAG: str(torch.get_num_threads()),
            tracking.CPU_TAG: machine.cpu_model(), tracking.CPU_FLAGS_TAG: " ".join(machine.cpu_flags()) or "none"}
    tags |= {tracking.VERSION_TAGS[p]: v for p, v in machine.package_versions(tracking.PACKAGES).items()}
    commit = tracking.git_commit(SOURCE) if SOURCE else None  # an installed wheel has no commit of its own
    if commit:
        tags[tracking.GIT_COMMIT_TAG] = commit
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


def train_and_record(spec: RunSpec, recording: Recording, params: Mapping[str, Any], config_yaml: str,
                     env: Mapping[str, str], extra_tags: Mapping[str, str] | None = None) -> tuple[list[float], str]:
    """Prepare (fail fast), then train inside one MLflow run; returns (objective values, run id).

    `params` (flat) and `config_yaml` are the resolved config as recorded, secrets masked here. In a sweep (`env`
    holds the trial, see study.current_trial) every epoch is reported to the trial, which may prune it, and the
    run is the one the sweeper made for the trial (MLFLOW_RUN_ID). `extra_tags` go on the run with its own."""
    prepared = prepare(spec)
    for warning in prepared.warnings:
        log.warning(warning)
    trial = current_trial(env)
    client = tracking.make_client(recording.tracking_uri)
    tags = run_tags(str(prepared.device)) | tracking.source_tags() | dict(extra_tags or {})
    run_id = env.get("MLFLOW_RUN_ID") if trial.number is not None else None
    with tracking.RunRecorder(client, recording.experiment, recording.run_name, tags=tags, run_id=run_id,
                              finished_on=(optuna.TrialPruned,)) as rec:  # a pruned run is complete as far as it went
        rec.log_params({k: mask_secrets(str(v)) for k, v in params.items()})
        artifacts.log_dataset(client, rec.run_id, spec.data, prepared.splits)
        rec.log_text(mask_secrets(config_yaml), "config.yaml")
        rec.log_metrics({"model/params": prepared.num_params}, step=0)

        def epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            rec.log_metrics(metrics, step=epoch)
            log.info(format_epoch(epoch, spec.trainer.epochs, metrics))
            trial.report(metrics[spec.optimized_metric[0]], step=epoch, last=epoch == spec.trainer.epochs)

        bar = progress_bar(sys.stdout.isatty(), spec.trainer.epochs, spec.data.batch_size)
        bar = startup.marking_first_step(bar)
        start = time.perf_counter()
        history = fit(prepared, epoch_end, bar)
        fit_seconds = time.perf_counter() - start
        test, pred, label = evaluate(prepared, prepared.splits.test)
        rec.log_metrics({"test/acc": test["acc"], "test/loss": test["loss"], "time/fit_seconds": fit_seconds,
                         "time/test_seconds": time.perf_counter() - start - fit_seconds}, step=spec.trainer.epochs)
        artifacts.log_model_weights(rec, prepared.eval_model, spec.model)  # the EMA's weights, when on
        rec.log_figure(artifacts.confusion_figure(confusion_matrix(pred, label),
                                                  f"test set: accuracy {test['acc']:.4f}"), "confusion_matrix.png")
        values = objective_values(history, prepared.num_params, spec.optimized_metric)
        log.info(f"val/acc {history[-1]['val/acc']:.4f}  test/acc {test['acc']:.4f}  "
                 f"({', '.join(f'{n} {v:.4g}' for n, v in zip(spec.optimized_metric, values))} optimized)")
        if trial.number is None:  # a sweep's trials: the study's lines say where its runs are
            uri = mask_secrets(recording.tracking_uri)
            log.info(f"MLflow run {rec.run_id} in experiment {recording.experiment!r} at {uri}. "
                     f"See it with: mlflow ui --backend-store-uri {uri}  (then open "
                     f"http://127.0.0.1:5000/#/experiments/{rec.experiment_id}/runs/{rec.run_id})")
    return values, rec.run_id



"""The Hydra sweeper plugin (`hydra/sweeper: mnist_optuna`): the hydra-optuna-sweeper plugin's search-space
grammar and samplers, plus what that plugin lacks.

- Pruning: each trial's job gets its trial's identity (storage, study, number) as config values, reports every
  epoch to the study, and stops when the pruner says so; the trial ends PRUNED, not FAIL.
- Resume: `n_trials` is the study's total budget. Re-running the same command continues the same study; trials
  left RUNNING by a dead process are failed via heartbeats and re-queued once.
- Workers: the same command on many machines shares one study (PostgreSQL storage) and its budget exactly; a
  worker leaves once the budget is spent and no trial is running, so it picks up the trials of a dead worker.
- Failures: a diverging trial is FAIL with its reason and the sweep goes on; a config error stops the sweep at the
  first trial with the single-run message; `max_failure_rate` is the share of failed trials in the study.
- Records: one MLflow parent run per study (reused on resume) with a child run per trial; at the end the best
  value and params, plots and counts go to the parent, and the best trial is written as an experiment config.

This module and `__main__` are the only ones that touch Hydra; the study logic is in `mnist_sweep.sweep`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from . import sweep, tracking
from .errors import ConfigError, DivergedError, UserError
from .train import check_metric_names

log = logging.getLogger("mnist_sweep.sweeper")
SAMPLER_TARGETS = ("optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*")
CONFIG_GROUPS = {"model", "optimizer", "scheduler", "data", "trainer", "pruner", "experiment"}


class MnistOptunaSweeper(Sweeper):
    def __init__(self, sampler: DictConfig, direction: Any = None, storage: str | None = None,
                 study_name: str | None = None, space_name: str = "default", n_trials: int = 12, n_jobs: int = 1,
                 max_failure_rate: float = 0.5, params: DictConfig | None = None,
                 heartbeat_interval: int = 10, grace_period: int = 30, experiment_dir: str = "outputs/configs",
                 custom_search_space: str | None = None) -> None:
        if custom_search_space:
            raise ConfigError("hydra.sweeper.custom_search_space is not supported by mnist_optuna; put the space "
                              "in hydra.sweeper.params")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate} must be in [0, 1]")
        if n_trials < 1 or n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials} and hydra.sweeper.n_jobs={n_jobs} must be >= 1")
        self.sampler_cfg = sampler
        self.direction = direction
        self.storage_url = storage or "sqlite:///outputs/optuna.db"
        self.study_name = study_name
        self.space_name = space_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.experiment_dir = experiment_dir
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # read-only, gone
            print(f"error: Optuna storage {sweep.shown_url(self.storage_url)!r} (hydra.sweeper.storage) failed: "
                  f"{sweep.first_line(e)}; finished trials are kept, run the same command again to resume",
                  file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: the running trial is marked FAIL in the study and its MLflow run KILLED; run the "
                  "same command again to resume", file=sys.stderr)
            raise SystemExit(130) from None

    # -- the study ----------------------------------------------------------------------------------------------

    def _sweep(self, arguments: list[str]) -> None:
        space_args = [f"{k}={v}" for k, v in (self.params or {}).items()] + list(arguments)
        try:
            distributions, fixed, fixed_overrides = create_params_from_overrides(space_args)
        except Exception as e:
            raise ConfigError(f"search space could not be parsed ({type(e).__name__}: {e}); use the plugin's "
                              "grammar, e.g. 'model.dropout=interval(0.1,0.6)', 'model.fc_width=choice(64,128)', "
                              "'optimizer.lr=tag(log,interval(1e-4,1e-1))'") from None
        for name in fixed:
            distributions.pop(name, None)
        metrics = self._metrics()
        directions = self._directions(metrics)
        fixed_args = [f"{k}={v}" for k, v in fixed.items()] + list(fixed_overrides)
        name = self.study_name or sweep.study_name_for(self.space_name, distributions, fixed_args)
        storage = sweep.make_storage(self.storage_url, self.heartbeat_interval, self.grace_period)
        self.client = tracking.make_client(self.config.mlflow.tracking_uri)  # checks a tracking server answers
        sampler, n_trials = self._sampler(storage, name, distributions)
        study = sweep.open_study(storage, name, directions, sampler)
        parent = self._parent_run(study, distributions, directions)
        log.info(f"study {name!r} in {self.storage_url}: {sweep.budget_used(study)}/{n_trials} trials used; "
                 f"sampler {type(sampler).__name__}, pruner {self.config.pruner._target_}, "
                 f"directions {directions}; MLflow parent run {parent.run_id}")
        self._close_orphan_child_runs(study, parent.run_id)
        status = "FINISHED"
        try:
            self._run_trials(study, storage, distributions, fixed_args, metrics, parent.run_id, n_trials)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._summarize(study, parent, name, status)

    def _metrics(self) -> list[str]:
        metrics = self.config.optimized_metric
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        check_metric_names(metrics)
        return metrics

    def _directions(self, metrics: list[str]) -> list[str]:
        derived = sweep.directions_for(metrics)
        if self.direction is None:
            return derived
        given = [self.direction] if isinstance(self.direction, str) else list(self.direction)
        given = [getattr(d, "name", d) for d in given]
        if given != derived:
            raise ConfigError(f"hydra.sweeper.direction={given} contradicts optimized_metric={metrics}, which is "
                              f"{derived}; leave direction null to follow the metric")
        return given

    def _sampler(self, storage, name: str, distributions: dict) -> tuple[optuna.samplers.BaseSampler, int]:
        try:
            existing = len(optuna.load_study(study_name=name, storage=storage).trials)
        except KeyError:
            existing = 0
        return self._seeded_sampler(existing, distributions)

    def _reseed_if_others_claimed(self, study: optuna.Study, distributions: dict) -> None:
        """Workers started together would draw the same points from the same seed: when the study holds other
        trials than this worker last saw, its sampler is rebuilt with the seed offset by the study's size."""
        existing = len(study.get_trials(deepcopy=False))
        if existing != self.seeded_for:
            study.sampler, _ = self._seeded_sampler(existing, distributions)

    def _seeded_sampler(self, existing: int, distributions: dict) -> tuple[optuna.samplers.BaseSampler, int]:
        """Instantiate the sampler; its seed is offset by the trials already in the study so a resumed study
        draws new points. GridSampler gets its grid from the space and caps n_trials at the grid size."""
        self.seeded_for = existing
        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        if cfg.get("seed") is not None:
            cfg["seed"] = sweep.reseeded(cfg["seed"], existing)
        try:
            sampler = instantiate(cfg, _execution_whitelist_=SAMPLER_TARGETS)
        except Exception as e:
            raise ConfigError(f"hydra.sweeper.sampler: {cfg.get('_target_')!r} could not be built: {e}") from None
        n_trials = self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {k: OptunaSweeperImpl._to_grid_sampler_choices(d) for k, d in distributions.items()}
            sampler = sampler(grid)
            size = 1
            for values in grid.values():
                size *= len(values)
            if size < n_trials:
                log.info(f"GridSampler: the grid has {size} points; n_trials {n_trials} -> {size}")
            n_trials = min(n_trials, size)
        return sampler, n_trials

    def _parent_run(self, study: optuna.Study, distributions: dict, directions: list[str]):
        with sweep.claim_lock(study._storage, study.study_name):  # workers starting together make one parent
            return self._find_or_create_parent_run(study, distributions, directions)

    def _find_or_create_parent_run(self, study: optuna.Study, distributions: dict, directions: list[str]):
        parent_id = study.user_attrs.get(sweep.PARENT_RUN_ATTR)
        if parent_id is not None:
            return tracking.RunRecorder.resume(self.client, parent_id)
        rec = tracking.RunRecorder(self.client, self.config.mlflow.experiment, run_name=study.study_name,
                                   tags={"study": study.study_name, "kind": "study"})
        rec.log_params({"study": study.study_name, "sampler": type(study.sampler).__name__,
                        "pruner": self.config.pruner._target_, "storage": sweep.shown_url(self.storage_url),
                        "optimized_metric": ",".join(self._metrics()), "directions": ",".join(directions),
                        **{f"space.{k}": repr(v) for k, v in distributions.items()}})
        study.set_user_attr(sweep.PARENT_RUN_ATTR, rec.run_id)
        return rec

    def _close_orphan_child_runs(self, study: optuna.Study, parent_id: str) -> None:
        """Child runs left RUNNING by a killed process, whose trial is no longer running, are marked KILLED.

        Runs are listed before trials, and re-read before they are closed: another worker's run that started or
        finished meanwhile is left alone."""
        runs = tracking.child_runs(self.client, parent_id, status="RUNNING")
        running = {t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
        for run in runs:
            if int(run.data.tags.get("trial_number", -1)) not in running and \
                    self.client.get_run(run.info.run_id).info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, "trial_state", "FAIL")
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def _run_trials(self, study, storage, distributions, fixed_args, metrics, parent_id: str, n_trials: int) -> None:
        """Claim, run and tell trials until the budget is spent and none is running, here or in another worker
        (a dead worker's trial goes stale, is re-queued and claimed here)."""
        overrides: dict[int, list[str]] = {}
        waiting_for = 0

        def prepare(trial) -> None:
            ov = overrides[trial.number] = self._overrides(study, trial, distributions, fixed_args, parent_id)
            trial.set_user_attr(sweep.OVERRIDES_ATTR, [o for o in ov if not o.startswith("optuna_trial.")])
            self.seeded_for = len(study.get_trials(deepcopy=False))  # still under the claim lock

        while True:
            batch = sweep.claim_trials(study, n_trials, self.n_jobs,
                                       lambda s: self._reseed_if_others_claimed(s, distributions), prepare)
            if not batch:
                if not (running := sweep.running_count(study)):
                    return
                if running != waiting_for:
                    log.info(f"budget spent; waiting for {running} running trial(s) of other workers to end")
                waiting_for = running
                time.sleep(max(1, self.heartbeat_interval))
                continue
            try:
                with sweep.heartbeat(storage, [t._trial_id for t in batch]):
                    returns = self.launcher.launch([overrides.pop(t.number) for t in batch],
                                                   initial_job_idx=self.job_idx)
            except KeyboardInterrupt:
                for trial in batch:
                    self._tell(study, trial, TrialState.FAIL, None, "interrupted (Ctrl-C)")
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(batch, returns):
                self._record(study, trial, ret, len(metrics))
            failed = sweep.failed_count(study)
            if failed > self.max_failure_rate * n_trials:
                raise UserError(f"{failed} trials of the study failed, more than hydra.sweeper.max_failure_rate="
                                f"{self.max_failure_rate} of its {n_trials} trials; see the trials' "
                                f"'{sweep.FAIL_REASON_ATTR}' in the study and their MLflow runs")

    def _overrides(self, study, trial, distributions, fixed_args, parent_id: str) -> list[str]:
        for name, dist in distributions.items():
            trial._suggest(name, dist)
        ov = [f"{k}={v}" for k, v in trial.params.items()] + fixed_args
        threads = self._threads_per_job()
        if threads and not any(o.startswith("trainer.threads=") for o in ov):
            ov.append(f"trainer.threads={threads}")
        return ov + [
            f"optuna_trial.storage={_quote(self.storage_url)}",
            f"optuna_trial.study={_quote(study.study_name)}",
            f"optuna_trial.number={trial.number}",
            f"optuna_trial.parent_run_id={parent_id}",
        ]

    def _threads_per_job(self) -> int | None:
        """Jobs in parallel processes share the cores: jobs x threads must not exceed them."""
        if type(self.launcher).__name__ != "JoblibLauncher" or self.n_jobs < 2:
            return None
        return max(1, (os.cpu_count() or 1) // self.n_jobs)

    def _record(self, study, trial, ret: JobReturn, n_objectives: int) -> None:
        """Tell the trial's outcome: COMPLETE, PRUNED, or FAIL with its reason."""
        if ret.status == JobStatus.COMPLETED:
            values = ret._return_value
            values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
            if len(values) != n_objectives:
                self._tell(study, trial, TrialState.FAIL, None, f"job returned {values}, expected "
                           f"{n_objectives} value(s)")
                return
            self._tell(study, trial, TrialState.COMPLETE, values)
            return
        error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            self._tell(study, trial, TrialState.PRUNED, None, str(error))
            return
        reason = f"{type(error).__name__}: {error}"
        self._tell(study, trial, TrialState.FAIL, None, reason)
        if isinstance(error, UserError) and not isinstance(error, DivergedError):
            raise type(error)(f"trial {trial.number} ({' '.join(ret.overrides or [])}) stopped the sweep: {error}")
        log.warning(f"trial {trial.number} failed: {reason}")

    def _tell(self, study, trial, state: TrialState, values, reason: str | None = None) -> None:
        if reason:
            trial.set_user_attr(sweep.FAIL_REASON_ATTR if state == TrialState.FAIL else "end_reason", reason[:2000])
        try:
            study.tell(trial, values=values, state=state, skip_if_finished=True)
        except RuntimeError as e:  # GridSampler calls study.stop() on its last point; the state is stored
            if "Study.stop" not in str(e):
                raise
        run_id = study._storage.get_trial_user_attrs(trial._trial_id).get("mlflow_run_id")
        if run_id:
            self.client.set_tag(run_id, "trial_state", state.name)

    # -- the end of an invocation --------------------------------------------------------------------------------

    def _summarize(self, study: optuna.Study, parent, name: str, status: str) -> None:
        counts = sweep.state_counts(study)
        parent.log_metrics({f"trials/{k.lower()}": v for k, v in counts.items()}, step=sum(counts.values()))
        parent.set_tags({"n_trials": self.n_trials})
        for file, fig in sweep.history_figures(study).items():
            parent.log_figure(fig, file)
        results = sweep.results_summary(study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        best = sweep.best_trials(study)
        if best and len(study.directions) == 1:
            trial = best[0]
            parent.log_metrics({f"best/{m}": v for m, v in zip(self._metrics(), trial.values)}, step=trial.number)
            parent.set_tags({f"best.{k}": v for k, v in trial.params.items()} | {"best.trial": trial.number})
            if trial.user_attrs.get("mlflow_run_id"):
                self._register_best(parent, trial.user_attrs["mlflow_run_id"])
            self._write_best_experiment(study, trial, name)
            log.info(f"best trial {trial.number}: {self._metrics()[0]}={trial.value:.4f} {trial.params}")
        elif best:
            log.info(f"Pareto front: {len(best)} trials: " + "; ".join(f"#{t.number} {t.values}" for t in best))
        parent.log_text(OmegaConf.to_yaml(OmegaConf.create(results)), "optimization_results.yaml")
        log.info(f"trials by state: {', '.join(f'{k} {v}' for k, v in counts.items() if v)}")
        self._close_orphan_child_runs(study, parent.run_id)  # a dead worker's trial, failed while we ran
        self.client.set_terminated(parent.run_id, status=status)

    def _register_best(self, parent, run_id: str) -> None:
        parent.set_tags({"best.run_id": run_id})
        name = self.config.mlflow.get("registered_model")
        if name:
            version = tracking.register_model(self.client, run_id, name)
            parent.set_tags({"best.model_uri": f"models:/{name}/{version.version}"})
            log.info(f"best model registered in MLflow as models:/{name}/{version.version}")

    def _write_best_experiment(self, study: optuna.Study, trial, name: str) -> None:
        overrides = [o for o in trial.user_attrs.get(sweep.OVERRIDES_ATTR, []) if not o.startswith("trainer.threads=")]
        folder = Path(self.experiment_dir) / "experiment"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_best.yaml"
        path.write_text(sweep.experiment_yaml(
            overrides, CONFIG_GROUPS, f"best trial {trial.number} of study {name}: {trial.value}"))
        log.info(f"best config written to {path}; re-run it with:\n    python -m mnist_sweep experiment={name}_best"
                 f"\n    (or: python -m mnist_sweep {' '.join(overrides)})")


def _quote(value: str) -> str:
    """A Hydra override value that survives the override grammar (URLs with ':', '@', '?')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

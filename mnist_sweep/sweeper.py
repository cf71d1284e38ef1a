"""The Hydra sweeper plugin (`hydra/sweeper: mnist_optuna`): the hydra-optuna-sweeper plugin's search-space
grammar and samplers, plus what that plugin lacks.

- Pruning: each trial's job finds its trial through environment variables (`sweep.TrialRef`), reports every
  epoch to the study, and stops when the pruner says so; the trial ends PRUNED, not FAIL.
- Resume: `n_trials` is the study's total budget. Re-running the same command continues the same study; trials
  left RUNNING by a dead process are failed via heartbeats and re-queued once, and so is an interrupted trial.
- Workers: the same command on many machines shares one study (PostgreSQL storage) and its budget exactly; a
  worker leaves once the budget is spent and no trial is running, so it picks up the trials of a dead worker.
- Failures: a diverging trial, or a job that returns no number, is FAIL with its reason and the sweep goes on;
  a config error stops the sweep at the first trial with the single-run message; `max_failure_rate` is the
  share of failed trials in the study.
- Records: one MLflow parent run per study (reused on resume) with a child run per trial; at the end the best
  value and params, plots and counts go to the parent, and the best trial is written as an experiment config.

This module and `__main__` are the only ones that touch Hydra; the study logic is in `mnist_sweep.sweep`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna
import sqlalchemy
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from . import sweep, tracking
from .errors import ConfigError, DivergedError, Terminated, UserError
from .redact import mask_secrets
from .train import check_metric_names

log = logging.getLogger("mnist_sweep.sweeper")
SAMPLER_TARGETS = ("optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*")
# Overrides that say where the study lives or how the job runs, not what it trains: kept out of the best
# trial's experiment config
NOT_A_RECIPE = ("storage", "hydra", "trainer.threads", "hparams_search", "mlflow")
SIGNIFICANT_DIGITS = 4  # floats in the trial lines printed to the user


class MnistOptunaSweeper(Sweeper):
    def __init__(self, sampler: DictConfig, direction: Any = None, storage: str | None = None,
                 study_name: str | None = None, space_name: str = "default", n_trials: Any = 12, n_jobs: Any = 1,
                 max_failure_rate: Any = 0.5, params: DictConfig | None = None,
                 heartbeat_interval: Any = 10, grace_period: Any = 30, experiment_dir: str = "outputs/configs",
                 custom_search_space: str | None = None) -> None:
        # Checked in sweep(), where a bad value is one error line; raised here it would be Hydra's traceback
        self.settings = dict(n_trials=n_trials, n_jobs=n_jobs, max_failure_rate=max_failure_rate,
                             heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        self.custom_search_space = custom_search_space
        self.sampler_cfg = sampler
        self.direction = direction
        self.storage_url = storage or "sqlite:///outputs/optuna.db"
        self.study_name = study_name
        self.space_name = space_name
        self.params = params
        self.experiment_dir = experiment_dir
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._check_settings()
            self._sweep(arguments)
        except UserError as e:
            print(f"error: {mask_secrets(str(e))}", file=sys.stderr)
            raise SystemExit(2) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # read-only, gone
            print(f"error: Optuna storage {sweep.shown_url(self.storage_url)!r} (hydra.sweeper.storage) failed: "
                  f"{mask_secrets(sweep.first_line(e))}; finished trials are kept, run the same command "
                  "again to resume", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as e:
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            print(f"{how}: the running trial is marked FAIL in the study (its parameters run again on resume) and "
                  "its MLflow run KILLED; run the same command again to resume", file=sys.stderr)
            raise SystemExit(143 if isinstance(e, Terminated) else 130) from None

    def _check_settings(self) -> None:
        s = self.settings
        for key in ("n_trials", "n_jobs", "heartbeat_interval", "grace_period"):
            if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
                raise ConfigError(f"hydra.sweeper.{key}={s[key]!r} must be an integer >= 1")
        rate = s["max_failure_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={rate!r} must be a number in [0, 1] (the share of "
                              "the study's trials that may fail before the sweep stops)")
        if self.custom_search_space:
            raise ConfigError("hydra.sweeper.custom_search_space is not supported by mnist_optuna; put the space "
                              "in hydra.sweeper.params")
        self.n_trials, self.n_jobs, self.max_failure_rate = s["n_trials"], s["n_jobs"], float(rate)
        self.heartbeat_interval, self.grace_period = s["heartbeat_interval"], s["grace_period"]

    # -- the study ----------------------------------------------------------------------------------------------

    def _sweep(self, arguments: list[str]) -> None:
        experiment = self.config.mlflow.experiment
        if not isinstance(experiment, str) or not experiment.strip():  # checked before the parent run is made
            raise ConfigError(f"mlflow.experiment={experiment!r} must be a non-empty name")
        distributions, fixed_args = self._search_space(arguments)
        metrics = self._metrics()
        directions = self._directions(metrics)
        name = sweep.check_study_name(self.study_name or sweep.study_name_for(self.space_name, distributions,
                                                                              fixed_args))
        storage = sweep.make_storage(self.storage_url, self.heartbeat_interval, self.grace_period)
        self.client = tracking.make_client(self.config.mlflow.tracking_uri)  # checks a tracking server answers
        sampler, n_trials = self._sampler(storage, name, distributions)
        study = sweep.open_study(storage, name, directions, sampler)
        study.set_metric_names(metrics)  # optuna-dashboard labels its axes with them
        if self._budget_spent(study, n_trials):
            return
        # The jobs find the study's storage here: the environment, inherited by launcher processes, keeps a
        # password out of Hydra's saved job configs (see sweep.STORAGE_ENV)
        os.environ[sweep.STORAGE_ENV] = self.storage_url
        with self._parent_run(study, distributions, directions) as parent:
            log.info(f"study {name!r} in {sweep.shown_url(self.storage_url)}: {sweep.budget_used(study)}/"
                     f"{n_trials} trials used; sampler {type(sampler).__name__}, pruner "
                     f"{self.config.pruner._target_}, directions {directions}; MLflow parent run {parent.run_id}")
            self._close_orphan_child_runs(study, parent.run_id)
            try:
                self._run_trials(study, storage, distributions, fixed_args, metrics, parent.run_id, n_trials)
            finally:
                self._summarize(study, parent, name)

    def _search_space(self, arguments: list[str]) -> tuple[dict, list[str]]:
        """The distributions to sample and the fixed overrides of every trial.

        A key the user sets on the command line wins over the search space: `model=small` leaves out the
        space's model.* keys and `model.fc_width=64` its model.fc_width, and the sweep says which it left out."""
        try:
            given, given_fixed, given_other = create_params_from_overrides(list(arguments))
            space, space_fixed, space_other = create_params_from_overrides(
                [f"{k}={v}" for k, v in (self.params or {}).items()])
        except Exception as e:
            raise ConfigError(f"search space could not be parsed ({type(e).__name__}: {e}); use the plugin's "
                              "grammar, e.g. 'model.dropout=interval(0.1,0.6)', 'model.fc_width=choice(64,128)', "
                              "'optimizer.lr=tag(log,interval(1e-4,1e-1))'") from None
        user_keys = [k for k in given_fixed] + [k.lstrip("~") for k in given_other]

        def fixed_by_user(key: str) -> bool:
            return any(key == u or key.startswith(f"{u}.") for u in user_keys)

        dropped = sorted(k for k in list(space) + list(space_fixed) if fixed_by_user(k) and k not in given)
        if dropped:
            log.warning(f"search space: left out {', '.join(dropped)}: fixed on the command line")
        distributions = {k: v for k, v in space.items() if k not in dropped} | given
        fixed = {k: v for k, v in space_fixed.items() if k not in dropped and k not in given} | given_fixed
        for key in given:
            fixed.pop(key, None)
        fixed_args = [f"{k}={v}" for k, v in fixed.items()] + space_other + given_other
        return distributions, fixed_args

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

    def _budget_spent(self, study: optuna.Study, n_trials: int) -> bool:
        """A finished study's command says so in one line, and leaves nothing behind (no run, no folder)."""
        optuna.storages.fail_stale_trials(study)
        used = sweep.budget_used(study)
        if used < n_trials or sweep.running_count(study):
            return False
        best = sweep.best_trials(study)
        found = (f"; best trial #{best[0].number}: {self._metrics()[0]}={best[0].value:.4f}"
                 if best and len(study.directions) == 1 else "")
        log.info(f"study {study.study_name!r} has used its budget ({used}/{n_trials} trials){found}. To run more, "
                 f"raise it: hydra.sweeper.n_trials={n_trials + max(1, n_trials // 2)} (the total, not the "
                 "additional trials)")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        try:
            sweep_dir.rmdir()  # made by the output-folder check before the sweep started; only if empty
        except OSError:
            pass
        return True

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
            raise ConfigError(f"hydra.sweeper.sampler: {cfg.get('_target_')!r} could not be built: "
                              f"{sweep.first_line(e)}") from None
        n_trials = self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {k: grid_choices(k, d) for k, d in distributions.items()}
            sampler = sampler(grid)
            size = math.prod(len(values) for values in grid.values())
            if size < n_trials:
                log.info(f"GridSampler: the grid has {size} points; n_trials {n_trials} -> {size}")
            n_trials = min(n_trials, size)
        return sampler, n_trials

    @contextmanager
    def _parent_run(self, study: optuna.Study, distributions: dict, directions: list[str]) -> Iterator[Any]:
        """The study's MLflow run for this invocation. One status rule: FINISHED when the invocation ends
        normally, KILLED on Ctrl-C or SIGTERM, FAILED on anything else, whatever fails while summarizing."""
        with sweep.claim_lock(study._storage, study.study_name):  # workers starting together make one parent
            parent = self._find_or_create_parent_run(study, distributions, directions)
        status = "FAILED"
        try:
            yield parent
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.retry_locked(self.client.set_terminated, parent.run_id, status=status)

    def _find_or_create_parent_run(self, study: optuna.Study, distributions: dict, directions: list[str]):
        parent_id = study.user_attrs.get(sweep.PARENT_RUN_ATTR)
        if parent_id is not None:
            return tracking.RunRecorder.resume(self.client, parent_id)
        rec = tracking.RunRecorder(self.client, self.config.mlflow.experiment, run_name=study.study_name,
                                   tags={"study": study.study_name, "kind": "study"} | tracking.source_tags())
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
            sweep.suggest(trial, distributions)
            ov = [f"{k}={v}" for k, v in trial.params.items()] + fixed_args
            trial.set_user_attr(sweep.OVERRIDES_ATTR, [mask_secrets(o) for o in ov])
            ref = sweep.TrialRef(self.storage_url, study.study_name, trial.number, parent_id)
            overrides[trial.number] = ov + self._job_settings(ov) + [
                f"++hydra.job.env_set.{k}={_quote(v)}" for k, v in ref.job_env().items()]
            self.seeded_for = len(study.get_trials(deepcopy=False))  # still under the claim lock

        quiet_launcher_logs()
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
            for trial in batch:
                log.info(f"trial {trial.number} started: {trial_params_text(trial.params)}")
            try:
                with sweep.heartbeat(storage, [t._trial_id for t in batch]):
                    returns = self.launcher.launch([overrides.pop(t.number) for t in batch],
                                                   initial_job_idx=self.job_idx)
            except KeyboardInterrupt as e:
                reason = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
                for trial in batch:
                    self._tell(study, trial, TrialState.FAIL, None, reason)
                    retry_once(study, trial.number)
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(batch, returns):
                self._record(study, trial, ret, len(metrics))
                log.info(trial_end_line(study, trial.number, n_trials, metrics[0]))
            failed = sweep.failed_count(study)
            if failed > self.max_failure_rate * n_trials:
                raise UserError(f"{failed} trials of the study failed, more than hydra.sweeper.max_failure_rate="
                                f"{self.max_failure_rate} of its {n_trials} trials; see the trials' "
                                f"'{sweep.FAIL_REASON_ATTR}' in the study and their MLflow runs")

    def _job_settings(self, overrides: list[str]) -> list[str]:
        """Jobs in parallel processes share the cores: jobs x threads must not exceed them."""
        if type(self.launcher).__name__ != "JoblibLauncher" or self.n_jobs < 2:
            return []
        if any(o.startswith("trainer.threads=") for o in overrides):
            return []
        return [f"trainer.threads={max(1, (os.cpu_count() or 1) // self.n_jobs)}"]

    def _record(self, study, trial, ret: JobReturn, n_objectives: int) -> None:
        """Tell the trial's outcome: COMPLETE, PRUNED, or FAIL with its reason."""
        if ret.status == JobStatus.COMPLETED:
            values = objective_values(ret.return_value, n_objectives)
            if isinstance(values, str):
                self._tell(study, trial, TrialState.FAIL, None, values)
                return
            self._tell(study, trial, TrialState.COMPLETE, values)
            return
        try:
            ret.return_value  # re-raises the job's exception: the public way to get it
            error: BaseException = RuntimeError("the job failed without an exception")
        except Exception as e:
            error = e
        if isinstance(error, optuna.TrialPruned):
            self._tell(study, trial, TrialState.PRUNED, None, str(error))
            return
        reason = mask_secrets(f"{type(error).__name__}: {error}")
        self._tell(study, trial, TrialState.FAIL, None, reason)
        if isinstance(error, UserError) and not isinstance(error, DivergedError):
            shown = " ".join(o for o in (ret.overrides or []) if not o.startswith("hydra."))
            raise type(error)(f"trial {trial.number} ({shown}) stopped the sweep: {error}")

    def _tell(self, study, trial, state: TrialState, values, reason: str | None = None) -> None:
        if reason:
            trial.set_user_attr(sweep.FAIL_REASON_ATTR if state == TrialState.FAIL else "end_reason", reason[:2000])
        try:
            study.tell(trial, values=values, state=state, skip_if_finished=True)
        except RuntimeError as e:  # GridSampler calls study.stop() on its last point; the state is stored
            if "Study.stop" not in str(e):
                raise
        run_id = study._storage.get_trial_user_attrs(trial._trial_id).get(sweep.RUN_ID_ATTR)
        if run_id:
            self.client.set_tag(run_id, "trial_state", state.name)

    # -- the end of an invocation --------------------------------------------------------------------------------

    def _summarize(self, study: optuna.Study, parent, name: str) -> None:
        counts = sweep.state_counts(study)
        parent.log_metrics({f"trials/{k.lower()}": v for k, v in counts.items()}, step=sum(counts.values()))
        parent.set_tags({"n_trials": self.n_trials})
        from .report import tidy_figures

        completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        for file, fig in tidy_figures(sweep.history_figures(study), self._metrics()[0], completed).items():
            parent.log_figure(fig, file)
        results = sweep.results_summary(study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        parent.log_text(OmegaConf.to_yaml(OmegaConf.create(results)), "optimization_results.yaml")
        best = sweep.best_trials(study)
        if best and len(study.directions) == 1:
            self._record_best(study, parent, name, best[0])
        elif best:
            log.info(f"Pareto front: {len(best)} trials: " + "; ".join(f"#{t.number} {t.values}" for t in best))
        log.info(f"trials by state: {', '.join(f'{k} {v}' for k, v in counts.items() if v)}")
        self._close_orphan_child_runs(study, parent.run_id)  # a dead worker's trial, failed while we ran

    def _record_best(self, study: optuna.Study, parent, name: str, trial) -> None:
        parent.log_metrics({f"best/{m}": v for m, v in zip(self._metrics(), trial.values)}, step=trial.number)
        parent.set_tags({f"best.{k}": v for k, v in trial.params.items()} | {"best.trial": trial.number})
        run_id = trial.user_attrs.get(sweep.RUN_ID_ATTR)
        if run_id:
            self._register_best(parent, run_id)
        self._write_best_experiment(trial, name)
        log.info(f"best trial {trial.number}: {self._metrics()[0]}={trial.value:.4f} "
                 f"{trial_params_text(trial.params)}")

    def _register_best(self, parent, run_id: str) -> None:
        parent.set_tags({"best.run_id": run_id})
        name = self.config.mlflow.get("registered_model")
        if not name:
            return
        version = tracking.register_model(self.client, run_id, name)  # a run registered before keeps its version
        parent.set_tags({"best.model_uri": f"models:/{name}/{version.version}"})
        log.info(f"best model registered in MLflow as models:/{name}/{version.version}")

    def _write_best_experiment(self, trial, name: str) -> None:
        choices, values = recipe(trial.user_attrs.get(sweep.OVERRIDES_ATTR, []),
                                 set(self.config.hydra.runtime.choices.keys()))
        folder = Path(self.experiment_dir) / "experiment"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_best.yaml"
        path.write_text(sweep.experiment_yaml(choices, values,
                                              f"best trial {trial.number} of study {name}: {trial.value}"))
        plain = [f"{k}={v}" for k, v in choices.items()] + [f"{k}={_quote_value(v)}" for k, v in values.items()]
        log.info(f"best config written to {path}; re-run it with:\n    python -m mnist_sweep "
                 f"experiment={shlex.quote(name + '_best')}\n    (or: python -m mnist_sweep "
                 f"{' '.join(shlex.quote(o) for o in plain)})")


def objective_values(returned: Any, n_objectives: int) -> list[float] | str:
    """A job's return value as the trial's values, or why it cannot be (the trial then FAILs)."""
    items = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(items) or len(items) != n_objectives:
        return (f"the job returned {str(returned)[:200]!r} ({type(returned).__name__}); expected "
                f"{'a number' if n_objectives == 1 else f'a list of {n_objectives} numbers'}")
    values = [float(v) for v in numbers]
    if not all(math.isfinite(v) for v in values):
        return f"the job returned {values}, which is not finite"
    return values


def retry_once(study: optuna.Study, number: int) -> None:
    """Queue an interrupted trial's parameters again, once: the same rule as a trial whose process died."""
    trials = study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == number)
    if RetryHeartbeatStaleTrialCallback.retry_history(frozen):
        return  # itself a retry: its parameters had their second chance
    if any(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number for t in trials):
        return  # already queued
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, frozen)


def recipe(overrides: list[str], groups: set[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """A trial's overrides as (group choices, values), unescaped, without what only says where or how it ran."""
    choices: dict[str, str] = {}
    values: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element().lstrip("+~")
        if override.is_delete() or any(key == k or key.startswith(f"{k}.") for k in NOT_A_RECIPE):
            continue
        if key in groups:
            choices[key] = str(override.value())
        else:
            values[key] = override.value()
    return choices, values


def grid_choices(name: str, d) -> list:
    """The points of one parameter of a grid: a choice's options, an integer range, or a stepped float range."""
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return list(range(d.low, d.high + 1, d.step))
    if isinstance(d, FloatDistribution) and d.step is not None and not d.log:
        return [d.low + i * d.step for i in range(int(round((d.high - d.low) / d.step)) + 1)]
    raise ConfigError(f"hydra/sweeper/sampler=grid needs a finite grid, but {name} is {d!r}; use choice(...) or "
                      "range(...), or another sampler")


def trial_params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.{SIGNIFICANT_DIGITS}g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items())


def trial_end_line(study: optuna.Study, number: int, n_trials: int, metric: str) -> str:
    """'trial 3 (4/12) COMPLETE val/acc 0.9871 (best so far #1: 0.9890)', 'PRUNED at epoch 2 ...', 'FAIL: why'."""
    trials = sweep.counted_trials(study)
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    done = sum(1 for t in trials if t.state.is_finished())
    head = f"trial {number} ({done}/{n_trials}) {trial.state.name}"
    if trial.state == TrialState.FAIL:
        return f"{head}: {trial.user_attrs.get(sweep.FAIL_REASON_ATTR, 'no reason recorded')}"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        head += f" at epoch {step} {metric} {trial.intermediate_values[step]:.4f}"
    elif trial.values:
        head += " " + " ".join(f"{n} {v:.4f}" for n, v in zip(study.metric_names or [metric], trial.values))
    best = sweep.best_trials(study)
    if best and len(study.directions) == 1:
        head += f" (best so far #{best[0].number}: {best[0].value:.4f})"
    return head


def quiet_launcher_logs() -> None:
    """Hydra's launchers print each job's full override list (16-digit floats, internal keys); the sweeper's own
    trial lines say the same in a form people read."""
    for name in ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quote(value: str) -> str:
    """A Hydra override value that survives the override grammar (URLs with ':', '@', '?')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_value(value: Any) -> str:
    """A value as an override writes it: true/false/null, a plain word, or a quoted string."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str) and not re.fullmatch(r"[\w./:@+-]+", value):
        return _quote(value)
    return str(value)

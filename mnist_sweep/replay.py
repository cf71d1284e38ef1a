"""`python -m mnist_sweep.replay RUN_ID` (or `--study NAME --trial N`): train a recorded run again from the config
it logged, and say whether the result came out the same.

The replay reads the run's `config.yaml` artifact (the resolved config it trained), trains it as a new MLflow run in
the same experiment, tagged `replay_of=RUN_ID`, and prints the original's and the replay's val/acc and test/acc
side by side with whether they are identical. It warns for each way this machine differs from the original's
tags: package versions, CPU, CPU flags, torch threads, device, git commit. On a CPU, in fp32, with
`trainer.deterministic=true` and the same environment, the metrics are identical to the last digit.

A trial of a sweep replays as a plain single run: its sampled values are in its config, while the study, the
pruner and the sweep's settings play no part. A pruned trial therefore trains all its epochs, and its val/acc is
compared at the epoch where it was pruned. The replay trains with the original's torch thread count (a sweep's
parallel trials had fewer threads than a single run gets), unless the config sets trainer.threads.

Exit status: 0 identical, 1 the metrics differ, 2 an error (one `error:` line).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from omegaconf import OmegaConf

from . import shell, tracking
from .config import Recording, logged_spec
from .errors import DataError, UserError, one_line
from hydra_plugins.hydra_optuna_pruning_sweeper import mask_secrets
from .run import train_and_record

log = logging.getLogger("mnist_sweep")
CONFIG_FILE = "config.yaml"  # the artifact every run of `python -m mnist_sweep` logs (run.train_and_record)
COMPARED_METRICS = ("val/acc", "test/acc")


@dataclass(frozen=True)
class Source:
    """The run to replay, as recorded."""

    run_id: str
    run_name: str
    experiment: str  # the name of its MLflow experiment, where the replay is recorded too
    status: str  # FINISHED, FAILED, KILLED, RUNNING
    tags: Mapping[str, str]
    config_yaml: str


@dataclass(frozen=True)
class Row:
    """One metric of the original and of the replay, at the original's last step of it."""

    metric: str
    step: int | None  # None: the original never logged it
    original: float | None
    replay: float | None

    @property
    def identical(self) -> bool:
        return self.original is not None and self.original == self.replay


def find_trial_run(client, study: str, number: int, uri: str) -> str:
    """The run id of trial `number` of study `study`, from the tags the sweeper puts on every trial's run."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{tracking.STUDY_TAG}` = '{study}' and tags.`{tracking.TRIAL_NUMBER_TAG}` = '{number}'"
    runs = client.search_runs(experiments, query, max_results=10) if experiments else []
    if not runs:
        raise UserError(f"--study {study} --trial {number}: no such trial's run in {mask_secrets(uri)}; pass "
                        "--tracking-uri with the sweep's mlflow.tracking_uri, or the run id")
    if len(runs) > 1:
        raise UserError(f"--study {study} --trial {number}: {len(runs)} runs match "
                        f"({', '.join(r.info.run_id for r in runs)}); pass the run id instead")
    return runs[0].info.run_id


def read_source(client, run_id: str, uri: str) -> Source:
    """The run and its logged config; UserError when there is no such run or it logged no config."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise UserError(f"no MLflow run {run_id!r} in {mask_secrets(uri)} ({one_line(e, typed=False)}); pass "
                        "a run id from that store (mlflow ui shows them), or --tracking-uri with the store that "
                        "holds it") from None
    tags = run.data.tags
    if tags.get(tracking.KIND_TAG) == tracking.STUDY_KIND:
        study = tags.get(tracking.STUDY_TAG, "?")
        raise UserError(f"MLflow run {run_id} is the parent run of study {study!r}, which trained nothing; replay "
                        f"one of its trials: --study {study} --trial N, or a trial's run id")
    with tempfile.TemporaryDirectory() as tmp, tracking.quiet_transfers():
        try:
            text = Path(client.download_artifacts(run_id, CONFIG_FILE, tmp)).read_text()
        except (MlflowException, OSError) as e:
            raise UserError(f"MLflow run {run_id} has no readable {CONFIG_FILE} artifact to replay it from "
                            f"({one_line(e, typed=False)}): only runs of `python -m mnist_sweep` log one, and "
                            "their artifacts must be reachable from here") from None
    experiment = client.get_experiment(run.info.experiment_id).name
    return Source(run_id, run.info.run_name or run_id, experiment, run.info.status, dict(tags), text)


def replay_threads(original_tags: Mapping[str, str], config_threads: int) -> int | None:
    """The torch thread count to train with: the original's (its tag), unless the config sets trainer.threads
    (prepare sets that one) or the original recorded none."""
    recorded = original_tags.get(tracking.THREADS_TAG, "")
    return int(recorded) if config_threads == 0 and recorded.isdigit() and int(recorded) > 0 else None


def replay(client, uri: str, source: Source, data_root: str | None = None) -> str:
    """Train `source`'s config again as a plain single run in its experiment; returns the new run's id."""
    try:
        spec, resolved = logged_spec(source.config_yaml, data_root)
    except UserError as e:
        raise UserError(f"the {CONFIG_FILE} of MLflow run {source.run_id}: {e}") from None
    recording = Recording(uri, source.experiment, f"replay-{source.run_name}")
    threads, before = replay_threads(source.tags, spec.trainer.threads), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _, run_id = train_and_record(spec, recording, tracking.flatten(resolved), OmegaConf.to_yaml(resolved),
                                     env={}, extra_tags={tracking.REPLAY_OF_TAG: source.run_id})
    except DataError as e:  # the run's data.root is another machine's folder, or a relative one
        raise DataError(f"{e} (the run's data.root; --data-root DIR replays it with MNIST from DIR)") from None
    finally:
        torch.set_num_threads(before)  # here or trainer.threads set them; a caller in this process keeps its own
    return run_id


def metric_steps(client, run_id: str, metric: str) -> dict[int, float]:
    """{step: value} of a run's metric (the last value logged at each step)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp)}


def compare(original: Mapping[str, Mapping[int, float]], replayed: Mapping[str, Mapping[int, float]]) -> list[Row]:
    """Each metric at the last step the original logged it (a pruned trial stopped early), the replay's at the
    same step."""
    rows = []
    for metric, steps in original.items():
        step = max(steps, default=None)
        rows.append(Row(metric, step, steps.get(step), replayed.get(metric, {}).get(step)))
    return rows


def environment_differences(original: Mapping[str, str], replayed: Mapping[str, str]) -> list[str]:
    """One line per environment tag (tracking.ENVIRONMENT_TAGS) whose value differs between the two runs, and one
    naming the tags the original did not record."""
    lines, missing = [], []
    for tag in tracking.ENVIRONMENT_TAGS:
        if tag not in original:
            missing.append(tag)
        elif original[tag] != replayed.get(tag):
            lines.append(f"{tag} differs: {original[tag]!r} in the original, {replayed.get(tag)!r} in the replay")
    if missing:
        lines.append(f"the original run recorded no {', '.join(missing)} (it predates these tags): a difference "
                     "there would go unnoticed")
    return lines


def _shown(value: float | None) -> str:
    return "-" if value is None else repr(value)  # repr: every digit of the stored double


def comparison_table(rows: list[Row]) -> str:
    width = max(len("original"), *(len(_shown(v)) for r in rows for v in (r.original, r.replay)))
    lines = [f"{'metric':<10} {'step':>4}  {'original':<{width}}  {'replay':<{width}}  same"]
    for r in rows:
        same = "yes" if r.identical else ("no" if r.original is not None else "-")
        step = "-" if r.step is None else str(r.step)
        lines.append(f"{r.metric:<10} {step:>4}  {_shown(r.original):<{width}}  {_shown(r.replay):<{width}}  {same}")
    return "\n".join(lines)


def describe(source: Source) -> str:
    trial = source.tags.get(tracking.TRIAL_NUMBER_TAG)
    where = f" (trial {trial} of study {source.tags.get(tracking.STUDY_TAG, '?')})" if trial else ""
    return f"run {source.run_id} {source.run_name!r}{where} in experiment {source.experiment!r}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.replay", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 identical, 1 the metrics differ, 2 an error.")
    parser.add_argument("run_id", nargs="?", default=None, help="the MLflow run to replay")
    parser.add_argument("--study", default=None, help="with --trial: replay this study's trial instead")
    parser.add_argument("--trial", type=int, default=None, help="with --study: the trial number")
    parser.add_argument("--tracking-uri", default=shell.DEFAULT_TRACKING_URI,
                        help="the MLflow store that holds the run; the replay is recorded there too")
    parser.add_argument("--data-root", default=None,
                        help="where MNIST is on this machine, if not at the run's data.root")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    by_trial = args.study is not None or args.trial is not None
    if by_trial == (args.run_id is not None) or by_trial and (args.study is None or args.trial is None):
        raise UserError("name the run to replay: a run id, or --study NAME --trial N (not both)")
    client = tracking.existing_client(args.tracking_uri)
    run_id = args.run_id or find_trial_run(client, args.study, args.trial, args.tracking_uri)
    source = read_source(client, run_id, args.tracking_uri)
    print(f"replaying {describe(source)} from its {CONFIG_FILE}", flush=True)
    if source.status != "FINISHED":
        print(f"warning: the original run is {source.status}: it is compared where its metrics stop",
              file=sys.stderr)
    new_id = replay(client, args.tracking_uri, source, args.data_root)
    rows = compare({m: metric_steps(client, source.run_id, m) for m in COMPARED_METRICS},
                   {m: metric_steps(client, new_id, m) for m in COMPARED_METRICS})
    for line in environment_differences(source.tags, client.get_run(new_id).data.tags):
        print(f"warning: {line}", file=sys.stderr)
    compared = [r for r in rows if r.original is not None]
    identical = bool(compared) and all(r.identical for r in compared)
    print(comparison_table(rows))
    print(f"identical: {'yes' if identical else 'no'} (run {source.run_id} replayed as run {new_id})")
    return 0 if identical else 1


@shell.command(stopped="the replay's MLflow run is marked KILLED")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tracking.quiet_artifact_progress()
    # the per-epoch lines, as a run of `python -m mnist_sweep` prints them
    handler, level = logging.StreamHandler(sys.stdout), log.level
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return run(args)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m mnist_sweep.report`: what a finished study found, as a terminal leaderboard and one HTML file.

The HTML report is self-contained (its PNGs are embedded as base64). The PNGs are also written next to it and
logged, with the HTML, to the study's MLflow parent run under `report/`. Optuna draws the study plots
(optimization history, importances, parallel coordinates, intermediate values, Pareto front); the best trial's
model is loaded from its MLflow run and evaluated on the test split for a confusion matrix and its worst mistakes.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

import hydra_plugins.hydra_optuna_pruning_sweeper as sweeper

from . import artifacts, shell, tracking
from .records import open_existing_study
from .data import background, default_root, load_mnist, normalize
from .errors import ConfigError, UserError, one_line

from .train import class_probs, confusion_matrix

STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAIL: 3,
               TrialState.WAITING: 4}


@dataclass(frozen=True)
class Row:
    """One trial of the leaderboard."""

    number: int
    state: str
    values: tuple[float, ...] | None  # the objectives of a completed trial, else None
    last_reported: float | None  # the last per-epoch value reported to the pruner
    epochs: int  # epochs that reported a value (where a pruned trial was cut)
    seconds: float | None
    params: dict[str, Any]


def leaderboard(study: optuna.Study, top: int) -> list[Row]:
    """The `top` trials: completed ones best first (by the first objective), then pruned ones by how far they
    got, then the rest."""
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def key(t: FrozenTrial):
        reported = list(t.intermediate_values.values())
        score = t.values[0] if t.values else (reported[-1] if reported else float("inf") * sign)
        return STATE_ORDER.get(t.state, 5), sign * score, t.number

    trials = sorted(study.get_trials(deepcopy=False), key=key)[:top]
    # Optuna stores a pruned trial's last report as its value: shown apart, it is not a final result
    return [Row(t.number, t.state.name, tuple(t.values) if t.state == TrialState.COMPLETE else None,
                list(t.intermediate_values.values())[-1] if t.intermediate_values else None,
                len(t.intermediate_values), t.duration.total_seconds() if t.duration else None, t.params)
            for t in trials]


def leaderboard_table(rows: Sequence[Row], metrics: Sequence[str], title: str):
    """The rows as a rich Table: one column per objective and per parameter."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in ["#", "state", *metrics, "epochs run", "seconds"]:
        table.add_column(name, justify="left" if name == "state" else "right", overflow="fold")
    params = sorted({p for r in rows for p in r.params})
    for p in params:  # the last part of the key, split at '_', keeps a narrow terminal readable
        table.add_column(p.rsplit(".", 1)[-1].replace("_", "\n"), justify="right", overflow="fold")
    for r in rows:
        table.add_row(*_cells(r, len(metrics), params))
    return table


def _cells(row: Row, n_metrics: int, params: Sequence[str]) -> list[str]:
    """A leaderboard row as text; a trial that did not complete shows its last per-epoch value in parentheses."""
    if row.values:
        values = [_fmt(v) for v in row.values]
    else:
        values = [f"({_fmt(row.last_reported)})" if row.last_reported is not None else "-"] + [""] * (n_metrics - 1)
    return [str(row.number), row.state, *values, str(row.epochs),
            f"{row.seconds:.0f}" if row.seconds is not None else "-", *[_fmt(row.params.get(p, "")) for p in params]]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def study_figures(study: optuna.Study, metrics: Sequence[str]) -> dict[str, Any]:
    """Optuna's plots of the study: those the sweep logs, plus parallel coordinates and the per-epoch curves."""
    from functools import partial

    import matplotlib
    from optuna.visualization import matplotlib as ovm

    # Optuna's plots switch the whole process to ggplot style: keep it to them (a grid through the confusion matrix)
    with matplotlib.rc_context():
        figures = sweeper.history_figures(study)
        extra: dict[str, Any] = {"intermediate_values.png": ovm.plot_intermediate_values}
        if len(study.directions) == 1:
            extra["parallel_coordinate.png"] = partial(ovm.plot_parallel_coordinate, target_name=metrics[0])
        else:  # Optuna needs one target: the first objective
            extra["parallel_coordinate.png"] = partial(ovm.plot_parallel_coordinate, target=lambda t: t.values[0],
                                                       target_name=metrics[0])
        figures.update(sweeper.optuna_figures(study, extra, size=(10, 5)))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sweeper.tidy_figures(figures, metrics[0], len(completed), sorted({p for t in completed for p in t.params}))




def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best trial, or for several objectives the Pareto-optimal one best in the first."""
    best = sweeper.best_trials(study)
    if not best:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(best, key=lambda t: t.values[0], reverse=maximize)[0]


def model_figures(probs: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                  worst: int = 24) -> tuple[dict[str, float], dict[str, Any]]:
    """The test-set accuracy, a confusion matrix and a grid of the `worst` mistakes (lowest probability of the
    true digit) with their true and predicted labels. `images` are the raw uint8 (N, 28, 28) test digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = probs.argmax(1)
    acc = (pred == labels).float().mean().item()
    figures = {"confusion_matrix.png": artifacts.confusion_figure(
        confusion_matrix(pred, labels), f"best model, test set: accuracy {acc:.4f}")}
    wrong = (pred != labels).nonzero().flatten()
    true_prob = probs[wrong, labels[wrong]]
    shown = wrong[true_prob.argsort()[:worst]].tolist()
    if shown:
        cols = min(8, len(shown))
        rows = -(-len(shown) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.8 * rows + 0.3), dpi=100, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, shown):
            ax.imshow(images[i].numpy(), cmap="gray_r")
            ax.set_title(f"true {labels[i].item()}\npred {pred[i].item()} {probs[i, pred[i]].item():.2f}",
                         fontsize=8)
        fig.suptitle(f"the {len(shown)} worst of {len(wrong)} mistakes (lowest probability of the true digit)",
                     fontsize=9)
        fig.tight_layout()
        plt.close(fig)
        figures["worst_mistakes.png"] = fig
    return {"test/acc": acc, "test/errors": float(len(wrong))}, figures


def png_bytes(figures: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        out[name] = buffer.getvalue()
    return out


CAPTIONS = {
    "optimization_history.png": "Optimization history: each completed trial's objective and the best so far.",
    "param_importances.png": "Optuna's parameter importances: how much of the objective's variance each "
                             "parameter explains (over the completed trials).",
    "parallel_coordinate.png": "Parallel coordinates: each completed trial's parameters, coloured by objective.",
    "intermediate_values.png": "Per-epoch validation metric of every trial; curves that stop early were pruned.",
    "pareto_front.png": "Pareto front of the objectives.",
    "confusion_matrix.png": "The best model on the test set: counts of true (rows) against predicted (columns).",
    "worst_mistakes.png": "The best model's worst test mistakes.",
}


def html_report(title: str, facts: dict[str, str], rows: Sequence[Row], metrics: Sequence[str],
                pngs: dict[str, bytes]) -> str:
    """One self-contained page: facts, the leaderboard and the figures (embedded PNGs)."""
    e = html.escape
    params = sorted({p for r in rows for p in r.params})
    head = "".join(f"<th>{_breakable(h)}</th>" for h in ["#", "state", *metrics, "epochs run", "seconds", *params])
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r, len(metrics), params)) + "</tr>")
    figures = "".join(
        f'<figure id="{e(name)}"><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{e(CAPTIONS.get(name, name))}</figcaption></figure>'
        for name, data in pngs.items())
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} th{{background:#f3f3f3}}
figure{{margin:2em 0}} img{{max-width:100%}} figcaption{{color:#555}}</style></head>
<body><h1>{e(title)}</h1><table>{fact_rows}</table>
<h2>Leaderboard</h2><p>(value): the last per-epoch value of a trial that did not complete.</p>
<div style="overflow-x:auto"><table><tr>{head}</tr>{"".join(body)}</table></div>
{figures}</body></html>
"""


def check_study_name(name: str, key: str = "--study") -> str:
    """`name` if it can name a study: it becomes a folder under outputs/reports/, so no path separators, no '.'
    or '..', not empty. Otherwise a ConfigError naming `key`."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{key}={name!r} is not a study name: it names a folder under outputs/reports/, so it "
                          "must be non-empty, without '/' or '\\', and not '.' or '..'")
    return name


def _breakable(name: str) -> str:
    """HTML of a parameter name that may wrap after '.' and '_' (a wide leaderboard stays on the page)."""
    return html.escape(name).replace(".", ".<wbr>").replace("_", "_<wbr>")


def evaluate_run_model(client, run_id: str, data_root: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The run's model on the MNIST test split: scores and the model figures."""
    from mlflow.exceptions import MlflowException

    try:
        model = artifacts.load_model(client, run_id)
        mean, std, shifts = tracking.input_settings(client, run_id)
    except (MlflowException, OSError, KeyError) as e:
        raise UserError(f"the best trial's model (MLflow run {run_id}) could not be loaded from "
                        f"{client.tracking_uri}: {one_line(e)}; "
                        "pass --no-model to report without it") from None
    arrays = load_mnist(data_root, download=False)
    # scored as the run tested: with its test-time shifts, the report's test/acc is the run's own
    probs = class_probs(model, normalize(arrays.test_images, mean, std, torch.device("cpu")), shifts,
                        background(mean, std))
    scores, figures = model_figures(probs, arrays.test_labels, arrays.test_images)
    return scores | {"test/n": float(len(probs))}, figures


def parent_run(client, run_id: str, study_name: str):
    """The study's MLflow parent run; a UserError when the tracking store does not hold it (another store, or the
    sweep's store was deleted and made anew)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"study {study_name!r} was recorded in an MLflow store that --tracking-uri "
                        f"{client.tracking_uri} is not: its parent run {run_id} is not there; pass --tracking-uri "
                        "with the sweep's mlflow.tracking_uri") from None


def write_report(study: optuna.Study, client, out: Path, data_root: str | None, top: int = 15):
    """Build everything, write the PNGs and report.html under `out`, log them to the parent run.
    Returns (leaderboard rows, metric names, facts, paths of the written files)."""
    parent_id = study.user_attrs.get(sweeper.PARENT_RUN_ATTR)
    parent = parent_run(client, parent_id, study.study_name) if parent_id else None
    objectives = parent.data.params.get(tracking.OPTIMIZED_METRIC_PARAM, "") if parent else ""
    metrics = [m for m in objectives.split(",") if m]
    if len(metrics) != len(study.directions):
        metrics = [f"objective {i}" for i in range(len(study.directions))]
    rows = leaderboard(study, top)
    counts = {k: v for k, v in sweeper.state_counts(study).items() if v}
    facts = {"study": study.study_name, "directions": ", ".join(d.name.lower() for d in study.directions),
             "trials": ", ".join(f"{k} {v}" for k, v in counts.items())}
    if parent_id:
        facts["MLflow parent run"] = parent_id
    figures = study_figures(study, metrics)
    best = best_trial(study)
    if best is not None:
        facts["best trial"] = f"#{best.number}: " + ", ".join(f"{m} {_fmt(v)}" for m, v in zip(metrics, best.values))
        facts["best params"] = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        run_id = best.user_attrs.get(sweeper.RUN_ID_ATTR)
        if run_id and data_root is not None:
            scores, model_figs = evaluate_run_model(client, run_id, data_root)
            facts["best model on the test set"] = (f"accuracy {scores['test/acc']:.4f} "
                                                   f"({scores['test/errors']:.0f} errors of {scores['test/n']:.0f})")
            facts["best model run"] = run_id
            figures.update(model_figs)
    pngs = png_bytes(figures)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in pngs.items():
        (out / name).write_bytes(data)
        written.append(out / name)
    page = out / "report.html"
    page.write_text(html_report(f"Study {study.study_name}", facts, rows, metrics, pngs))
    written.append(page)
    if parent_id:
        client.log_artifacts(parent_id, str(out), "report")
    return rows, metrics, facts, written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.report", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=shell.DEFAULT_STORAGE, help="Optuna storage URL")
    parser.add_argument("--study", default=None, help="study name (default: the one whose trials started last)")
    parser.add_argument("--tracking-uri", default=shell.DEFAULT_TRACKING_URI, help="MLflow tracking URI")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/reports/<study>)")
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ for the best model's test "
                        "evaluation (default: $MNIST_ROOT, else ./data)")
    parser.add_argument("--no-model", action="store_true", help="skip the best model's test evaluation")
    parser.add_argument("--top", type=int, default=15, help="trials in the leaderboard")
    return parser.parse_args(argv)


@shell.command(stopped="the report was not finished")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tracking.quiet_artifact_progress()
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: the table is not cut at 80
    if args.study is not None:
        check_study_name(args.study)
    study = open_existing_study(args.storage, args.study)
    out = Path(args.out) if args.out else Path("outputs") / "reports" / check_study_name(study.study_name)
    data_root = None if args.no_model else (args.data_root or default_root())
    client = tracking.existing_client(args.tracking_uri)
    rows, metrics, facts, written = write_report(study, client, out, data_root, args.top)
    console.print(leaderboard_table(rows, metrics, f"study {study.study_name}: top {len(rows)} trials"))
    for key, value in facts.items():
        console.print(f"[bold]{key}[/bold]: {value}")
    console.print(f"report: {written[-1]} ({len(written) - 1} PNGs beside it"
                  + (", logged to the MLflow parent run under report/)" if "MLflow parent run" in facts else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

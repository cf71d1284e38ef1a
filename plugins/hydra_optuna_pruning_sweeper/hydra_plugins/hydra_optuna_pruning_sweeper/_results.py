"""What a finished study found: its best trials, the plugin's results file, the best trial as an experiment
config, and Optuna's plots. Reads a study; changes nothing in it."""

from __future__ import annotations

from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState


def best_trials(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto front; empty when nothing completed. `trials`: a read of
    the study already made (single objective: the best is found in it, with no other read)."""
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        return []
    if len(study.directions) > 1:
        return study.best_trials
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    return [pick(completed, key=lambda t: t.value)]  # the first of equals


def results_summary(study: optuna.Study) -> dict[str, Any]:
    """optimization_results.yaml, in the shape the hydra-optuna-sweeper plugin writes it."""
    best = best_trials(study)
    if len(study.directions) > 1:
        return {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in best]}
    if not best:
        return {"name": "optuna", "best_params": {}, "best_value": None}
    return {"name": "optuna", "best_params": best[0].params, "best_value": best[0].value}


def experiment_yaml(choices: dict[str, str], values: dict[str, Any], comment: str) -> str:
    """A `# @package _global_` experiment config that reproduces a trial: group choices ({'optimizer': 'adamw'})
    go into the defaults list, values ({'model.dropout': 0.3}, already unescaped Python values) into the body."""
    import yaml

    body: dict[str, Any] = {}
    for key, value in values.items():
        node = body
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    lines = ["# @package _global_", f"# {comment}"]
    if choices:
        lines += ["defaults:"] + [f"  - override /{k}: {v}" for k, v in choices.items()]
    text = yaml.safe_dump(body, sort_keys=True).strip() if body else ""
    return "\n".join(lines + ([text] if text else [])) + "\n"


def history_figures(study: optuna.Study, importances_from: int = 2) -> dict[str, Any]:
    """Optuna's own matplotlib plots, as {artifact name: figure}; plots that need more trials are skipped.
    `importances_from`: the completed trials the parameter importances need (Optuna needs 2; fANOVA's import of
    scikit-learn alone takes seconds, which the sweep's summary only spends where the figure means something)."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        return {}
    from optuna.visualization import matplotlib as ovm

    if len(study.directions) == 1:
        plots = {"optimization_history.png": ovm.plot_optimization_history}
        if len(completed) >= max(2, importances_from):
            plots["param_importances.png"] = ovm.plot_param_importances
    elif len(study.directions) <= 3:  # Optuna draws Pareto fronts of 2 or 3 objectives
        plots = {"pareto_front.png": ovm.plot_pareto_front}
    else:
        plots = {}
    return optuna_figures(study, plots)


def optuna_figures(study: optuna.Study, plots: dict[str, Any], size: tuple[float, float] = (8, 5)) -> dict[str, Any]:
    """{name: plot function of optuna.visualization.matplotlib} -> {name: figure}; a plot that cannot be drawn
    (too few distinct values for importances, and the like) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, Any] = {}
    with matplotlib.rc_context():  # Optuna's plots switch the process to ggplot style: keep it to them
        for name, plot in plots.items():
            try:
                ax = plot(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(*size)
                fig.tight_layout()
                figures[name] = fig
                plt.close(fig)
            except Exception:
                continue
    return figures


FEW_TRIALS = 10  # below this many completed trials, parameter importances are mostly noise


def tidy_figures(figures: dict[str, Any], metric: str, completed: int, params: Sequence[str] = ()) -> dict[str, Any]:
    """Fix what Optuna's plots get wrong for a study: trials and epochs are whole numbers, the objective has its
    metric's name, the parallel coordinates' labels are whole and fit, and importances from few trials carry a
    caveat. `params`: the study's parameter names, which Optuna shortens."""
    from matplotlib.ticker import MaxNLocator

    for name, xlabel in (("optimization_history.png", "trial"), ("intermediate_values.png", "epoch")):
        if name in figures:
            ax = figures[name].axes[0]
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel=xlabel, ylabel=metric)
    for fig in figures.values():
        legend = fig.axes[0].get_legend() if fig.axes else None
        for text in legend.get_texts() if legend else ():
            if text.get_text() == "Objective Value":
                text.set_text(metric)
    if "param_importances.png" in figures and completed < FEW_TRIALS:
        fig = figures["param_importances.png"]
        fig.text(0.01, 0.01, f"Caveat: from only {completed} completed trials; with fewer than {FEW_TRIALS} these "
                 "importances are mostly noise.", color="#a00000", fontsize=11, va="bottom")
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.06)
    if "parallel_coordinate.png" in figures:
        _tidy_parallel_coordinates(figures["parallel_coordinate.png"], params)
    return figures


def _tidy_parallel_coordinates(fig, params: Sequence[str]) -> None:
    """Whole labels (Optuna cuts names at 17 characters), horizontal and staggered (rotated ones ran off the
    figure); no near-white lines: the worst trials were drawn invisible on the plot's background."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    ax = fig.axes[0]
    labels = ax.get_xticklabels()
    for i, label in enumerate(labels):
        text = label.get_text()
        whole = [p for p in params if text.endswith("...") and p.startswith(text[:-3])]
        label.set(text=whole[0] if len(whole) == 1 else text, rotation=0, ha="center")
        if i % 2:
            label.set_y(-0.07)  # every other label one line lower: long neighbours don't overlap
    ax.set_xticks(ax.get_xticks(), labels)
    for lines in ax.collections:
        cmap = lines.get_cmap()
        light_end_first = sum(cmap(0.0)[:3]) > sum(cmap(1.0)[:3])
        lines.set_cmap(ListedColormap(cmap(np.linspace(0.3, 1.0, 256) if light_end_first
                                           else np.linspace(0.0, 0.7, 256))))
    fig.tight_layout()

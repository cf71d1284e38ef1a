"""The search space: the upstream plugin's sweep grammar (choice, range, interval, tag(log, ...)) read through
Hydra's public override parser into Optuna distributions, and a trial's overrides back into a config."""

from __future__ import annotations

import re
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ._errors import ConfigError


def recipe(overrides: list[str], groups: set[str], exclude: tuple[str, ...] = ()) -> tuple[dict[str, str],
                                                                                       dict[str, Any]]:
    """A trial's overrides as (group choices, values), unescaped, without Hydra's own settings and without the
    keys (and their children) in `exclude`."""
    choices: dict[str, str] = {}
    values: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element().lstrip("+~")
        if override.is_delete() or any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in ("hydra", *exclude)):
            continue
        if key in groups:
            choices[key] = str(override.value())
        else:
            values[key] = override.value()
    return choices, values


def set_by(key: str, user_keys) -> bool:
    """Whether an override of one of `user_keys` sets `key`: the key itself, or a group or node above it
    (`model=small` sets model.fc_width)."""
    return any(key == u or key.startswith(f"{u}.") for u in user_keys)


def space_from_overrides(arguments: list[str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The upstream plugin's grammar, through Hydra's public override parser: (distributions of the sweeps,
    {key: value} of the plain overrides, the deletions as given)."""
    distributions, fixed, other = {}, {}, []
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_delete():
            other.append(override.input_line)
        elif override.is_sweep_override():
            distributions[override.get_key_element()] = distribution_of(override)
        else:
            fixed[override.get_key_element()] = override.get_value_element_as_str()
    return distributions, fixed, other


def distribution_of(override: Override) -> optuna.distributions.BaseDistribution:
    """choice(a,b) -> categorical; range(lo,hi[,step]) -> stepped int or float (hi excluded, as in Hydra);
    interval(lo,hi) -> uniform int or float; tag(log, interval(...)) -> log-uniform."""
    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and (value.shuffle or value.transformers)):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        points = [float(v) if not isinstance(v, int) else v for v in override.sweep_iterator()]
        if not points:
            raise ConfigError(f"{key}={override.get_value_element_as_str()} is an empty range")
        step = abs(value.step)
        if all(isinstance(v, int) for v in points):
            return IntDistribution(min(points), max(points), step=int(step))
        return FloatDistribution(min(points), max(points), step=float(step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{key}={override.get_value_element_as_str()}: this sweep is not supported; use choice, "
                      "range, interval or tag(log, interval(...))")


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


def quote(value: str) -> str:
    """A Hydra override value that survives the override grammar (URLs with ':', '@', '?')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_value(value: Any) -> str:
    """A value as an override writes it: true/false/null, a plain word, or a quoted string."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str) and not re.fullmatch(r"[\w./:@+-]+", value):
        return quote(value)
    return str(value)

"""The search space: the upstream plugin's sweep grammar (choice, range, interval, tag(log, ...)) read through
Hydra's public override parser into Optuna distributions, and a trial's overrides back into a config."""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ._errors import ConfigError

log = logging.getLogger("optuna_pruning")


def sweep_space(params: Mapping[str, Any] | None, arguments: list[str], warn: bool = True
                ) -> tuple[dict[str, Any], list[str]]:
    """The distributions to sample and the fixed overrides of every trial, from the search space (`params`) and
    the command line.

    A key the user sets on the command line wins over the search space: `model=small` leaves out the
    space's model.* keys and `model.fc_width=64` its model.fc_width, and the sweep says which it left out."""
    try:
        given, given_fixed, given_other = space_from_overrides(list(arguments))
        space, space_fixed, space_other = space_from_overrides([f"{k}={v}" for k, v in (params or {}).items()])
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"search space could not be parsed ({type(e).__name__}: {e}); use the plugin's "
                          "grammar, e.g. 'x=interval(0.1,0.6)', 'y=choice(64,128)', "
                          "'lr=tag(log,interval(1e-4,1e-1))'") from None
    user_keys = list(given_fixed) + [k.lstrip("~") for k in given_other]
    dropped = sorted(k for k in list(space) + list(space_fixed) if set_by(k, user_keys) and k not in given)
    if dropped and warn:
        log.warning(f"search space: left out {', '.join(dropped)}: fixed on the command line")
    distributions = {k: v for k, v in space.items() if k not in dropped} | given
    fixed = {k: v for k, v in space_fixed.items() if k not in dropped and k not in given} | given_fixed
    for key in given:
        fixed.pop(key, None)
    return distributions, [f"{k}={v}" for k, v in fixed.items()] + space_other + given_other


def sample_overrides(distributions: Mapping[str, Any], fixed: list[str]) -> list[str]:
    """One point of the space as a trial's overrides (each parameter's first choice or lower end): what the sweep
    composes once before any trial, so that a key the app's config cannot take fails there, not in a job."""
    def first(d) -> Any:
        return d.choices[0] if isinstance(d, CategoricalDistribution) else d.low

    return [f"{k}={quote_value(first(d))}" for k, d in distributions.items()] + list(fixed)


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
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and (value.shuffle or value.transformers)):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        points = [float(v) if not isinstance(v, int) else v for v in override.sweep_iterator()]
        if not points:
            raise ConfigError(f"{override_text(override)} is an empty range: it has no value to sample (the end "
                              "is excluded, as in Python); use e.g. range(1,2) or choice(1)")
        step = abs(value.step)
        if all(isinstance(v, int) for v in points):
            return IntDistribution(min(points), max(points), step=int(step))
        return FloatDistribution(min(points), max(points), step=float(step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{override_text(override)}: this sweep is not supported; use choice, "
                      "range, interval or tag(log, interval(...))")


def override_text(override: Override) -> str:
    """An override as the user wrote it ('x=range(1,1)'); Hydra cannot turn a sweep's value back into text."""
    return (override.input_line or override.get_key_element()).strip()


# GridSampler holds every point of the grid in memory, a tuple each (about 100 bytes): a million points is about
# 100 MB, and far more trials than a sweep runs; range(0,100000) x range(0,100000) would be 10^10 points
MAX_GRID_POINTS = 1_000_000


def grid_size(name: str, d) -> int:
    """How many points one parameter gives a grid: a choice's options, an integer range's or a stepped float
    range's values (counted, not listed)."""
    if isinstance(d, CategoricalDistribution):
        return len(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return (d.high - d.low) // d.step + 1
    if isinstance(d, FloatDistribution) and d.step is not None and not d.log:
        return int(round((d.high - d.low) / d.step)) + 1
    raise ConfigError(f"hydra/sweeper/sampler=grid needs a finite grid, but {name} is {d!r}; use choice(...) or "
                      "range(...), or another sampler")


def check_grid_size(distributions: Mapping[str, Any]) -> int:
    """The grid's number of points, before any is listed; a ConfigError naming each parameter's share when it is
    more than MAX_GRID_POINTS."""
    sizes = {k: grid_size(k, d) for k, d in distributions.items()}
    total = math.prod(sizes.values())
    if total > MAX_GRID_POINTS:
        shares = " x ".join(f"{k} {n:,}" for k, n in sizes.items())
        raise ConfigError(f"hydra/sweeper/sampler=grid: the grid has {total:,} points ({shares}), more than the "
                          f"{MAX_GRID_POINTS:,} it can hold in memory; use coarser range steps or fewer choices, "
                          "or a sampler that draws points (tpe, random, qmc)")
    return total


def grid_choices(name: str, d) -> list:
    """The points of one parameter of a grid (check_grid_size first: this lists them)."""
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution):
        return list(range(d.low, d.high + 1, d.step))
    return [d.low + i * d.step for i in range(grid_size(name, d))]


def quote(value: str) -> str:
    """A Hydra override value that survives the override grammar (URLs with ':', '@', '?')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_value(value: Any) -> str:
    """A value as an override writes it, so that Hydra reads back the same value and type: true/false/null, a
    number, a plain word, or a quoted string (a string Hydra would read as something else: 'a,b', "it's", '1',
    'true', 'nan')."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w./:@+-]*", value) and value.lower() not in READ_AS_OTHER
        return value if plain else quote(value)
    return str(value)


READ_AS_OTHER = {"true", "false", "null", "inf", "nan"}  # words Hydra's grammar reads as a bool, None or a float

"""Types of the plain values a config gives, checked before anything compares them with numbers.

YAML and Hydra's command line give int, float, bool, str, null or lists, whatever the key expects: without these
checks `trainer.epochs=abc` ends in "'<' not supported between instances of 'str' and 'int'" and
`trainer.epochs=1.5` is compared as is. Each check raises ConfigError naming the key, the value and the type.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from typing import Any, Mapping

from .errors import ConfigError


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """A value as the command line spells it: null, 'text', 1.5."""
    return "null" if value is None else repr(value)


# What a dataclass field of each annotated type accepts, and what the error says about it.
_FIELD_KINDS = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer"),
    float: (lambda v: is_number(v) and math.isfinite(v), "must be a finite number"),
    bool: (lambda v: isinstance(v, bool), "must be true or false"),
    str: (lambda v: isinstance(v, str), "must be a string; quote it on the command line, e.g. {key}='{value}'"),
}


def check_fields(cls: type, values: Mapping[str, Any], section: str) -> None:
    """Each of `values` (a config section) against the annotation of the dataclass field it will fill: an int
    must be an int (not a bool), a float any finite number, a bool a bool, a str a str. Keys that are not
    fields are left to cls(**values), whose TypeError names them."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _FIELD_KINDS.get(hints.get(field.name))
        if field.name not in values or kind is None:
            continue
        accepts, problem = kind
        value = values[field.name]
        if not accepts(value):
            key = f"{section}.{field.name}"
            raise ConfigError(f"{key}={shown(value)} " + problem.format(key=key, value=value))


_NUMERIC_ANNOTATION = re.compile(r"\b(int|float)\b")


def check_numeric_kwargs(target: Any, kwargs: Mapping[str, Any], section: str) -> None:
    """The kwargs that the signature of `target` (a torch optimizer or scheduler class) types, or defaults, as
    numbers must be numbers: lists of numbers where it takes a sequence (AdamW's betas), null where it takes
    None. Other kwargs, and names it does not take, are left to the class."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read
        return
    for name, value in kwargs.items():
        param = params.get(name)
        if param is None:
            continue
        annotation = param.annotation if isinstance(param.annotation, str) else str(param.annotation)
        if not (_NUMERIC_ANNOTATION.search(annotation) or is_number(param.default)):
            continue
        if value is None and (param.default is None or "None" in annotation):
            continue
        if isinstance(value, str) and re.search(r"\bstr\b", annotation):  # Hyperband's max_resource='auto'
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or not all(is_number(v) and math.isfinite(v) for v in items):
            raise ConfigError(f"{section}.{name}={shown(value)} must be a number")

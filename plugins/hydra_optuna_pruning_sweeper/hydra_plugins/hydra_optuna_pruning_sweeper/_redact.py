"""Passwords in URLs: found before Hydra saves a config, and masked in everything printed, logged or stored.

A password may reach a database URL only at run time (an ${oc.env:VAR} interpolation, PGPASSWORD, ~/.pgpass);
the resolved URL then exists in memory, and every text that could carry it out passes through `mask_secrets`.
"""

from __future__ import annotations

import re

# scheme://user:PASSWORD@host, anywhere in a text (a log line, a YAML dump, a quoted override)
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)([^\s@/'\"]+)(@)")
MASK = "***"


def mask_secrets(text: str) -> str:
    """Every URL password in `text` replaced by ***."""
    return _URL_PASSWORD.sub(rf"\1{MASK}\3", text)


def has_literal_password(value: str) -> bool:
    """A URL with a password written out, not a ${...} interpolation that resolves it at run time."""
    return any("${" not in m.group(2) and m.group(2) != MASK for m in _URL_PASSWORD.finditer(value))

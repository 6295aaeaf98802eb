"""One error family for every user-facing failure.

A `WSSSError` carries a single line that names the offending file or key and says how to fix
it. The `wsss` command prints that line and exits non-zero; a traceback is shown only when
``WSSS_DEBUG=1``.
"""
from __future__ import annotations


class WSSSError(Exception):
    """A problem with the user's data, config or environment (not a bug in wsss)."""


class DataError(WSSSError):
    """Missing, malformed or inconsistent dataset files."""


class ConfigError(WSSSError):
    """A config key is unknown, missing or out of range."""


class WeightsError(WSSSError):
    """Pretrained weights were requested but cannot be found."""

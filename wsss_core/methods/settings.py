"""Typed settings blocks for plug-ins: dataclass defaults, unknown keys rejected by name."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..errors import ConfigError

S = TypeVar("S")


def from_dict(cls: type[S], data: dict[str, Any] | None, where: str) -> S:
    """Build dataclass `cls` from `data`; a key that `cls` does not define is a ConfigError."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"config key {where}.{unknown[0]}: unknown (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        f = names[k]
        sub = f.metadata.get("block")
        kwargs[k] = from_dict(sub, v, f"{where}.{k}") if sub else v
    return cls(**kwargs)


def block(cls: type, **kw) -> Any:
    """A nested settings block field."""
    return dataclasses.field(default_factory=cls, metadata={"block": cls}, **kw)

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


def settings_schema(cls: type) -> dict[str, Any]:
    """JSON-schema fragment of settings dataclass `cls`: its field names (nested blocks
    recursively), nothing else; the config schema is assembled from these fragments."""
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("block")
        props[f.name] = settings_schema(sub) if sub else {}
    return {"type": "object", "additionalProperties": False, "properties": props,
            "description": (cls.__doc__ or cls.__name__).splitlines()[0]}

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


def check_backbones(settings: Any, where: str) -> None:
    """Every `backbone` field of a settings block (nested blocks included) that is built by
    name must name a model timm knows (the project's own, such as resnet_tiny, are registered with timm).

    Raises: ConfigError naming the key and close matches."""
    if not dataclasses.is_dataclass(settings):
        return
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("block"):
            check_backbones(value, f"{where}.{f.name}")
        elif f.name == "backbone" and getattr(settings, "embed_dim", None) is None:
            # (with embed_dim set, a from-scratch ViT is built and `backbone` is only a label)
            check_backbone_name(value, f"{where}.{f.name}")


def check_backbone_name(name: str, key: str) -> None:
    """Raise a ConfigError for `key` unless timm knows model `name`."""
    import difflib

    import timm

    from ..models import backbones  # noqa: F401  (registers the project's backbones with timm)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ConfigError(f"config key {key}: {name!r} is not a timm model{hint}")


def settings_schema(cls: type) -> dict[str, Any]:
    """JSON-schema fragment of settings dataclass `cls`: its field names (nested blocks
    recursively), nothing else; the config schema is assembled from these fragments."""
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("block")
        props[f.name] = settings_schema(sub) if sub else {}
    return {"type": "object", "additionalProperties": False, "properties": props,
            "description": (cls.__doc__ or cls.__name__).splitlines()[0]}

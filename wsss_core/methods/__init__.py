"""Method plug-ins, registered by name (timm-style registry)."""
from __future__ import annotations


from .base import MapSpec, Method, StepContext

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    _import_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method plug-in {name!r} (known: {sorted(_REGISTRY)})") from None


def create_method(params: dict, num_classes: int, train_params: dict | None = None) -> Method:
    return method_class(params["plugin"])(params, num_classes, train_params)


def list_methods() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def _import_builtin() -> None:
    from . import cam, cobra, seco  # noqa: F401  (registration side effect)


__all__ = ["Method", "MapSpec", "StepContext", "register_method", "create_method",
           "method_class", "list_methods"]

"""The method registry, a leaf module (timm's `_registry` pattern): method modules import
`register_method` from here, and nothing here imports a method module by name.

Built-in methods are the modules of this package (`wsss_core/methods/*.py`, those starting
with `_` and the shared helpers excepted): each registers its class when imported, so adding a
method is adding its module. A plug-in kept outside the package names its module in the config
(`methods.<key>.module`); `import_plugin` imports it the same way.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Method

_REGISTRY: dict[str, type["Method"]] = {}
_BUILTINS_LOADED = False


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make `cls` available under `cls.name`. Registering a second, different
    class under a taken name is an error (two plug-ins would silently shadow each other)."""
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ConfigError(f"method plug-in name {cls.name!r} is taken by {known.__module__}."
                          f"{known.__qualname__}; rename {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def import_plugin(module: str | None) -> None:
    """Import a plug-in module named in the config (`methods.<key>.module`); it registers its
    method class on import. ConfigError when it cannot be imported."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"config key methods.*.module: cannot import {module!r} ({e}); put its "
                          f"folder on PYTHONPATH") from None


def _import_builtin() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from . import __path__ as package_path
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def method_class(name: str, module: str | None = None) -> type["Method"]:
    """The registered class of plug-in `name` (importing `module` first when given)."""
    _import_builtin()
    import_plugin(module)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"config key methods.*.plugin: unknown method plug-in {name!r} "
                          f"(known: {', '.join(sorted(_REGISTRY))})") from None


def list_methods() -> list[str]:
    """Names of every registered plug-in (built-in ones and those imported so far)."""
    _import_builtin()
    return sorted(_REGISTRY)


def create_method(params: dict, num_classes: int, train_params: dict | None = None) -> "Method":
    """A method built from its resolved block (`config.method_params`): `plugin`, optional
    `module`, and the settings blocks the plug-in declares."""
    cls = method_class(params["plugin"], params.get("module"))
    return cls(params, num_classes, train_params)

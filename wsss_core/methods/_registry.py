"""The method registry, a leaf module (timm's `_registry` pattern): method modules import
`register_method` from here, and nothing here imports a method module by name.

Built-in methods are the modules of this package (`wsss_core/methods/*.py`, those starting
with `_` and the shared helpers excepted): each registers its class when imported, so adding a
method is adding its module. A plug-in kept outside the package names its module in the config
(`methods.<key>.module`); `import_plugin` imports it the same way.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Method

_REGISTRY: dict[str, type["Method"]] = {}
_BUILTINS_LOADED = False
#: where `describe_methods` keeps descriptions between processes (`keep_descriptions`)
_DESCRIPTION_FOLDER: Path | None = None
_DESCRIBED: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}


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


def keep_descriptions(folder: str | Path | None) -> None:
    """Keep the plug-in descriptions (`describe_methods`) in `folder`, under the fingerprint
    of the plug-in code, so a later process reads them instead of importing the plug-ins.
    The Snakefile calls it: Snakemake parses the workflow at every start (twice per cluster
    job), and the plug-ins import torch and timm (seconds)."""
    global _DESCRIPTION_FOLDER
    _DESCRIPTION_FOLDER = Path(folder) if folder is not None else None


def describe_methods(modules: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """What config checking and the workflow need of every registered plug-in (the built-in
    ones, and those of `modules`, plug-ins kept outside the package), without building one:
    name → {"blocks": {block name: JSON-schema fragment of its settings dataclass},
    "single_stage": bool, "class_maps": [names], "agnostic_maps": [names]}, blocks and maps
    in declaration order.

    Read from the folder given to `keep_descriptions` when a description of the same code is
    there (a SHA-256 over the sources of this package and every wsss_core module it imports);
    otherwise the plug-ins are imported, and the description is written there. Plug-ins outside
    the package are always imported: their code is not fingerprinted.

    Raises: ConfigError when a plug-in module cannot be imported."""
    modules = tuple(sorted({m for m in modules if m}))
    if modules in _DESCRIBED:
        return _DESCRIBED[modules]
    stored = None
    if _DESCRIPTION_FOLDER is not None and not modules:
        from ..codehash import source_hash
        code = source_hash(str(Path(__file__).resolve().parents[2]), __package__)
        stored = _DESCRIPTION_FOLDER / f"methods-{code}.json"
        if stored.is_file():
            try:
                _DESCRIBED[modules] = json.loads(stored.read_text())
                return _DESCRIBED[modules]
            except (OSError, ValueError):
                pass  # a damaged description is rebuilt below
    from .settings import settings_schema

    _import_builtin()
    for module in modules:
        import_plugin(module)
    described = {name: {"blocks": {block: settings_schema(c)
                                   for block, c in cls.settings_blocks.items()},
                        "single_stage": bool(cls.single_stage),
                        # what eval_seeds / ir_labels / fuse_seeds settings may ask of cams.h5
                        "class_maps": [m.name for m in cls.maps if m.kind == "class"],
                        "agnostic_maps": [m.name for m in cls.maps if m.kind == "agnostic"]}
                 for name, cls in sorted(_REGISTRY.items())}
    if stored is not None:
        from ..io import write_json
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_json(stored, described)
    _DESCRIBED[modules] = described
    return described


def describe_method(name: str, module: str | None = None) -> dict[str, Any]:
    """`describe_methods` of plug-in `name` alone (importing `module` first when given).

    Raises: ConfigError naming the known plug-ins when `name` is not registered."""
    described = describe_methods((module,) if module else ())
    if name not in described:
        raise ConfigError(f"config key methods.*.plugin: unknown method plug-in {name!r} "
                          f"(known: {', '.join(sorted(described))})")
    return described[name]

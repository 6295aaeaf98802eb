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


def create_method(name: str | dict, num_classes: int, train_params: dict | None = None, *,
                  module: str | None = None, **blocks: dict | None) -> "Method":
    """A method plug-in, built (timm's `create_model`, smp's `create_model` style).

    By name: `create_method("cobra", 21, model={"proj_dim": 128}, cobra={...})` builds plug-in
    `name` (importing `module` first when given) with `num_classes` classes (background
    included). Each keyword names one of the plug-in's settings blocks and may be partial: the
    keys left out, and the blocks left out, take the defaults of the plug-in's settings
    dataclasses (`settings_blocks`; nested blocks too), and `self.params` holds the filled
    blocks, as a config-resolved block would.

    From the config: `create_method(params, num_classes, train_params)` with the resolved
    block of `config.method_params` (`plugin`, optional `module`, `preset` and the settings
    blocks), as the stages and `load_method` call it.

    `train_params` are the train_classifier parameters some plug-ins read (`crop`, `seed`).

    Raises: ConfigError for an unknown plug-in, a block it does not declare, or a key a block
    does not define."""
    if isinstance(name, dict):
        if blocks or module is not None:
            raise TypeError("create_method(params, ...): the settings blocks are in `params`")
        params = name
        cls = method_class(params["plugin"], params.get("module"))
        return cls(params, num_classes, train_params)
    import dataclasses

    from .settings import from_dict

    cls = method_class(name, module)
    unknown = sorted(set(blocks) - set(cls.settings_blocks))
    if unknown:
        raise ConfigError(f"create_method({name!r}): the {name} plug-in has no {unknown[0]} block "
                          f"(its blocks: {', '.join(cls.settings_blocks) or 'none'})")
    params: dict[str, Any] = {"plugin": name}
    if module:
        params["module"] = module
    for block, block_cls in cls.settings_blocks.items():
        params[block] = dataclasses.asdict(from_dict(block_cls, blocks.get(block), block))
    return cls(params, num_classes, train_params)


def load_method(path: str | Path, device: Any = "cpu") -> "Method":
    """The trained method (eval mode, on `device`) from a classifier model file (written by
    train_classifier: its method block, class count and training parameters are in it).

    Raises: DataError / WeightsError (`checkpoint.read_model`) for a missing, damaged or
    foreign file."""
    from ..checkpoint import pretrained_blocks, read_model

    record = read_model(path, "classifier", map_location=device)
    method = dict(record["method"])
    # weights come from the file: never fetch ImageNet weights again
    for block in pretrained_blocks(method):
        block["pretrained"] = False
    m = create_method(method, int(record["num_classes"]), train_params=record.get("train_params"))
    m.load_state_dict(record["state"])
    m.to(device).eval()
    return m


def classifier_backbone_state(path: str | Path) -> dict:
    """The trained CNN backbone of a classifier model file (`Method.backbone_state`), for IRN
    and segmentation encoders started from it. The global RNG is left as it was, so building
    the method does not shift the initialisation of the model that receives the weights."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return load_method(path, "cpu").backbone_state()


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

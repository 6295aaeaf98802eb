"""Method plug-ins, registered by name (timm-style registry in `_registry`).

The registry functions import no plug-in and no torch; the contract's classes (`Method`,
`MapSpec`, `StepContext`, in `base`, which imports torch) load on first use, so that config
checking at every Snakemake start stays torch-free (`describe_methods`)."""
from __future__ import annotations

from typing import Any

from ._registry import (classifier_backbone_state, create_method, describe_method,
                        describe_methods, import_plugin, keep_descriptions, list_methods,
                        load_method, method_class, register_method)

__all__ = ["Method", "MapSpec", "StepContext", "register_method", "create_method",
           "method_class", "list_methods", "import_plugin", "describe_method", "describe_methods",
           "keep_descriptions", "load_method", "classifier_backbone_state"]


def __getattr__(name: str) -> Any:
    if name in ("Method", "MapSpec", "StepContext"):
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Method plug-ins, registered by name (timm-style registry in `_registry`)."""
from __future__ import annotations

from ._registry import create_method, import_plugin, list_methods, method_class, register_method
from .base import MapSpec, Method, StepContext

__all__ = ["Method", "MapSpec", "StepContext", "register_method", "create_method",
           "method_class", "list_methods", "import_plugin"]

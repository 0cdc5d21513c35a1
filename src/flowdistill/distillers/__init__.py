"""Distillation methods: the base class, the registry, and one module per method.

Every module in this package is imported on first use, so a method registers itself by
being a file here with an ``@register("name")`` class.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Distiller
from .registry import (
    REGISTRY,
    VARIANTS,
    get_method,
    list_methods,
    list_variants,
    make_distiller,
    method_options,
    register,
    register_variant,
    resolve,
    tune_points,
)

__all__ = [
    "REGISTRY",
    "VARIANTS",
    "Distiller",
    "get_method",
    "list_methods",
    "list_variants",
    "make_distiller",
    "method_options",
    "register",
    "register_variant",
    "resolve",
    "tune_points",
]

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")

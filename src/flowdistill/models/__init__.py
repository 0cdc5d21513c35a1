"""Model zoo: ``create_model(name, **kwargs)``; user models as ``package.module:function``."""

from __future__ import annotations

from . import cifar, gpt, imagenet, mobile, small  # noqa: F401  (importing registers the models)
from .registry import (
    MODELS,
    build_model,
    create_model,
    data_kwargs,
    list_models,
    register_model,
)
from .stages import feature_stages

__all__ = [
    "MODELS",
    "build_model",
    "create_model",
    "data_kwargs",
    "feature_stages",
    "list_models",
    "register_model",
]

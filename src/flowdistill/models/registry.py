"""Model registry and user factories given as ``package.module:function``."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = [
    "MODELS",
    "build_model",
    "create_model",
    "data_kwargs",
    "list_models",
    "register_model",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator registering a model factory under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A model of the project's zoo by name."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(
            f"unknown model {name!r}{hint}; known models: {', '.join(list_models())}; "
            "or give your own factory as 'package.module:function'"
        )
    try:
        return MODELS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"model {name!r} rejected its arguments {kwargs}: {err}") from None


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A zoo model (``"digits_teacher"``) or a user factory (``"mypkg.nets:make_net"``)."""
    if ":" not in name:
        return create_model(name, **kwargs)
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"cannot import module {module_name!r} for model {name!r}: {err}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {attr!r} (model {name!r})")
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(
            f"model factory {name!r} rejected its arguments {kwargs}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not nn.Module")
    return model


def data_kwargs(
    name: str, num_classes: int, in_channels: int, sequence_length: int | None = None
) -> dict[str, int]:
    """What the data say about zoo model ``name``: its number of classes, its input
    channels where it takes them (the CIFAR zoo reads RGB images only), and for a language
    model of token sequences its vocabulary (``vocab_size``, the number of classes) and
    context (``block_size``, the sequence length)."""
    factory = MODELS.get(name)
    if factory is None:
        return {}
    params = inspect.signature(factory).parameters
    out = {"num_classes": num_classes} if "num_classes" in params else {}
    if sequence_length is not None:
        if "vocab_size" in params:
            out["vocab_size"] = num_classes
        if "block_size" in params:
            out["block_size"] = sequence_length
    elif "in_channels" in params:
        out["in_channels"] = in_channels
    return out

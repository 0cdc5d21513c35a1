"""Name → class registry of distillation methods."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import itertools
import math
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, FlowdistillError, UnknownMethodError
from ..taps import LOGITS

if TYPE_CHECKING:
    from torch import nn

    from .base import Distiller

__all__ = [
    "REGISTRY",
    "VARIANTS",
    "get_method",
    "list_methods",
    "list_variants",
    "make_distiller",
    "register",
    "register_variant",
    "resolve",
    "tune_points",
]

REGISTRY: dict[str, type[Distiller]] = {}
#: named presets of a registered method (ablations): name -> (method, options, description)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {}


def register(name: str):
    """Class decorator: register a :class:`Distiller` subclass under ``name``."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        old = REGISTRY.get(name)
        redefined = old is not None and (old.__module__, old.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )  # the same class defined again (a notebook cell)
        if old is not None and old is not cls and not redefined:
            raise ConfigError(f"method {name!r} is already registered by {old}")
        if not (cls.__doc__ or "").strip():
            raise ConfigError(f"method {name!r} needs a docstring: its first line describes it")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def register_variant(name: str, method: str, description: str, **options: Any) -> None:
    """Register ``name`` as ``method`` with preset ``options`` (an ablation, say); it can
    be used wherever a method name can, and explicit options still override the preset."""
    if name in REGISTRY or (name in VARIANTS and VARIANTS[name][:2] != (method, options)):
        raise ConfigError(f"{name!r} is already registered")
    VARIANTS[name] = (method, dict(options), description)


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``(method, preset options)`` for a method or variant name."""
    if name in VARIANTS:
        method, options, _ = VARIANTS[name]
        return method, dict(options)
    get_method(name)
    return name, {}


def list_variants() -> list[str]:
    """Names of every registered variant, sorted."""
    return sorted(VARIANTS)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(REGISTRY)


def get_method(name: str) -> type[Distiller]:
    """The class registered as ``name``, or your own as ``"package.module:Class"`` (imported,
    and registered under that name unless its module registered it already); unknown names
    raise :class:`UnknownMethodError`."""
    if name in VARIANTS:
        return REGISTRY[VARIANTS[name][0]]
    if isinstance(name, str) and ":" in name and name not in REGISTRY:
        return _import_method(name)
    try:
        return REGISTRY[name]
    except KeyError:
        known = [*REGISTRY, *VARIANTS]
        same = [k for k in known if isinstance(name, str) and k.lower() == name.lower()]
        close = same or difflib.get_close_matches(str(name), known, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}{hint}; registered methods: {', '.join(list_methods())}; "
            f"variants: {', '.join(list_variants())}"
        ) from None


def _import_method(spec: str) -> type[Distiller]:
    """A :class:`Distiller` subclass named ``"package.module:Class"``."""
    from .base import Distiller

    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownMethodError(
            f"unknown method {spec!r}: cannot import {attr!r} from {module_name!r} ({exc})"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, Distiller)):
        raise UnknownMethodError(f"{spec!r} is not a flowdistill Distiller subclass")
    if any(cls is obj for cls in REGISTRY.values()):  # its module registered it on import
        return obj
    return register(spec)(obj)


def method_options(name: str) -> dict[str, Any]:
    """The keyword options a method accepts, with their defaults."""
    cls = get_method(name)
    _, preset = resolve(name)
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                options[p.name] = p.default
    return {**options, **preset}


def tune_points(name: str) -> list[dict[str, Any]]:
    """The grid points ``flowdistill bench --tune`` tries for ``name``: its method's
    ``tune_grid`` without the options a variant's preset fixes, duplicates dropped; a
    method with no grid has one point, its defaults (``{}``). An option the method does not
    accept raises :class:`ConfigError`."""
    cls = get_method(name)
    _, preset = resolve(name)
    grid = cls.tune_grid
    if isinstance(grid, dict):
        combos = itertools.product(*grid.values())
        points = [dict(zip(grid, values, strict=True)) for values in combos]
    else:
        points = [dict(p) for p in grid]
    accepted = method_options(name)
    out: list[dict[str, Any]] = []
    for point in points:
        unknown = sorted(set(point) - set(accepted))
        if unknown:
            raise ConfigError(f"the tune grid of {name!r} names unknown option(s) {unknown}")
        point = {k: v for k, v in point.items() if k not in preset}
        if point not in out:
            out.append(point)
    return out or [{}]


_SIMPLE = (bool, int, float, str)


def _typed(cls: type, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the types the method's ``__init__`` annotates (a number
    for a float option, and so on; a numeric string such as ``"1e-3"`` read as a number),
    so that a wrong type is named before anything is built. Options of other types
    (sequences, modules, tensors) pass as given."""
    from ..config import _coerce

    types_of = _simple_option_types(cls)
    typed = {
        k: _coerce(v, types_of[k], f"{name}.{k}") if k in types_of else v
        for k, v in options.items()
    }
    for k, v in typed.items():  # a NaN or infinite weight or temperature: named, not trained
        values = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(u, float) and not math.isfinite(u) for u in values):
            raise ConfigError(f"{name}.{k} must be a finite number, got {v!r}")
    return typed


@functools.cache
def _simple_option_types(cls: type) -> dict[str, Any]:
    """The options of ``cls`` annotated with a plain type (bool, int, float, str, or an
    optional one), read from the ``__init__`` of every class of its MRO."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = vars(klass).get("__init__")
        if init is not None:
            try:
                hints.update(typing.get_type_hints(init))
            except Exception:  # an annotation that does not resolve: left unchecked
                continue
    out = {}
    for key, tp in hints.items():
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if union else []
        if tp in _SIMPLE or (args and all(a in _SIMPLE for a in args)):
            out[key] = tp
    return out


def _recorded(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as JSON values, for a checkpoint's record: the example input left out,
    a tensor as its shape, any other object as its type's name."""

    def value(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        if isinstance(v, dict):
            return {str(k): value(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}"
        return type(v).__name__

    return {k: value(v) for k, v in options.items() if k != "example_input"}


def make_distiller(
    name: str, teacher: nn.Module | None, student: nn.Module, **options: Any
) -> Distiller:
    """Build the method ``name`` around the user's ``teacher`` and ``student`` modules.

    ``options`` are the method's keyword options (``flowdistill methods`` lists the methods;
    ``method_options(name)`` their options); an unknown option raises :class:`ConfigError`.
    """
    cls = get_method(name)
    accepted = method_options(name)
    options = {**resolve(name)[1], **options}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        public = sorted(k for k in accepted if k != "example_input")
        close = difflib.get_close_matches(unknown[0], public, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"method {name!r} has no option(s) {', '.join(map(repr, unknown))}{hint}; "
            f"its options are: {', '.join(public)}"
        )
    taps = [options.get(k, ()) for k in ("student_taps", "teacher_taps")]
    given = [n for names in taps if not isinstance(names, str) for n in names if n != LOGITS]
    if given and not cls.uses_feature_taps:
        raise ConfigError(
            f"method {name!r} does not distil features by tap: student_taps/teacher_taps "
            f"({', '.join(map(repr, given))}) would be ignored"
            + (f"; {cls.taps_hint}" if cls.taps_hint else "")
        )
    typed = _typed(cls, name, options)
    try:
        distiller = cls(teacher, student, **typed).follow_student_dtype()
        # every option, defaults included: what a resumed run is checked against
        distiller.options = _recorded({**accepted, **typed})
        return distiller
    except FlowdistillError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # from torch or a model
        example = options.get("example_input")
        shape = tuple(example.shape) if hasattr(example, "shape") else None
        if isinstance(example, Mapping):  # a dict of inputs: each entry's shape
            shape = {k: tuple(getattr(v, "shape", ())) for k, v in example.items()}
        shown = {k: v for k, v in options.items() if k != "example_input"}
        raise ConfigError(
            f"method {name!r} could not be built around this teacher and student "
            f"({type(exc).__name__}: {exc}); its options {shown}, example_input of shape "
            f"{shape}"
        ) from exc

"""Feature taps: intermediate outputs of any ``nn.Module``, named by module path.

A tap is a dotted module path as printed by ``model.named_modules()`` (``"layer3"``,
``"blocks.5.mlp"``, ``"encoder.layers.1"``), optionally followed by an index in brackets
to pick one element of a module that returns a tuple (``"rnn[0]"``). The special name
``"logits"`` is the model's own output: the first tensor when the model returns a tuple or
a list, the ``"logits"`` entry of a dict-like object (else its first tensor), or the element
that ``output`` names (an index into a tuple, a key or attribute name). Outputs are
captured with forward hooks; the model is never rewritten. A dataclass output is read like a
dict of its fields.

The hooks stay on the model while its taps live. A model saved whole (``torch.save``,
``pickle``) or copied (``copy.deepcopy``) on its own takes a copy of its taps along that
nothing holds, so the loaded or copied model comes back without hooks: it computes what the
original does and captures nothing (a distiller saved or copied whole keeps working taps).
TorchScript compiles every hook of a module and cannot compile these, so script such a copy
(``torch.jit.script(copy.deepcopy(model))``) or detach the hooks first with
:meth:`FeatureTaps.remove` (``distiller.student_taps.remove()``).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> taps = FeatureTaps(net, ["1", "logits"])
>>> taps.probe(torch.zeros(2, 4))
{'1': (8,), 'logits': (3,)}
>>> out, feats = taps(torch.zeros(5, 4))
>>> feats["1"].shape
torch.Size([5, 8])
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import TapError

__all__ = [
    "LOGITS",
    "FeatureTaps",
    "first_tensor",
    "module_paths",
    "resolve_module",
    "select_output",
]

LOGITS = "logits"
_INDEX = re.compile(r"^(?P<path>[^\[\]]*?)(?:\[(?P<index>-?\d+)\])?$")


def module_paths(model: nn.Module) -> list[str]:
    """All tappable module paths of ``model`` (the root, named ``""``, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at ``path``; a wrong path raises :class:`TapError` with suggestions."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    valid = module_paths(model)
    close = difflib.get_close_matches(path, valid, n=5, cutoff=0.4)
    if not close:  # fall back to paths sharing the first component
        head = path.split(".")[0]
        close = [p for p in valid if p.split(".")[0] == head][:5] or valid[:5]
    raise TapError(
        f"no module at path {path!r} in {type(model).__name__}; closest valid paths: "
        + ", ".join(repr(c) for c in close)
    )


def _entries(value: Any) -> Mapping | None:
    """A model output read as a dict: a mapping itself, a dataclass its fields by name."""
    if isinstance(value, Mapping):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def first_tensor(value: Any, index: int | None = None) -> torch.Tensor:
    """The tensor inside a module output: ``value[index]`` or the first tensor found (of a
    dict or a dataclass, its ``"logits"`` entry when it has one)."""
    if isinstance(value, torch.Tensor):
        if index is not None:
            raise TapError(f"output is a single tensor, it cannot be indexed with [{index}]")
        return value
    entries = _entries(value)
    if entries is not None:
        if index is None and entries.get("logits") is not None:
            return first_tensor(entries["logits"])
        value = list(entries.values())
    if isinstance(value, Sequence):
        if index is not None:
            if not -len(value) <= index < len(value):
                raise TapError(f"output has {len(value)} elements; index [{index}] is out of range")
            return first_tensor(value[index])
        for item in value:
            try:
                return first_tensor(item)
            except TapError:
                continue
    raise TapError(f"module output of type {type(value).__name__} holds no tensor")


def select_output(value: Any, output: int | str | None = None) -> torch.Tensor:
    """The logits inside a model's output: ``value[output]`` for an index into a tuple or
    list, the entry (or attribute) named ``output``, or by default :func:`first_tensor`.
    An output that holds no tensor :func:`first_tensor` can find raises :class:`TapError`
    naming the attributes that hold tensors (to pick one with ``output``)."""
    entries = _entries(value)
    if output is None:
        try:
            return first_tensor(value)
        except TapError:
            attributes = entries if entries is not None else getattr(value, "__dict__", {})
            held = [k for k, v in attributes.items() if isinstance(v, torch.Tensor)]
            if not held:
                raise
            raise TapError(
                f"the model output ({type(value).__name__}) holds no tensor flowdistill can "
                f"find by itself: name its logits with output= (student_output= / "
                f"teacher_output= of a distiller), one of {', '.join(map(repr, held))}"
            ) from None
    if isinstance(output, str):
        if isinstance(value, Mapping) and output in value:
            return first_tensor(value[output])
        if not isinstance(value, Mapping) and hasattr(value, output):
            return first_tensor(getattr(value, output))
        held = list(entries) if entries is not None else None
        raise TapError(
            f"the model output ({type(value).__name__}) has no entry {output!r}"
            + (f"; its entries: {', '.join(map(repr, held))}" if held is not None else "")
        )
    if entries is not None:
        raise TapError(
            f"the model returns a {type(value).__name__}: name its logits by key "
            f"(one of {', '.join(map(repr, entries))}), not by index [{output}]"
        )
    return first_tensor(value, output)


def check_output(output: Any, what: str) -> None:
    """An ``output`` selector is an index, a key or ``None``."""
    if output is not None and (isinstance(output, bool) or not isinstance(output, int | str)):
        raise TapError(
            f"{what} picks the logits out of the model's output: an index into a tuple "
            f"(int) or a key (str), got {output!r}"
        )


def _no_taps() -> None:
    """The taps of a :class:`_Capture` whose taps were gone when it was copied."""
    return None


class _Capture:
    """The forward hook of one tap: an object, not a closure, so that ``copy.deepcopy`` of
    a model together with its taps gives hooks that fill the *copied* taps. It holds its
    taps weakly: a model outliving its taps (a teacher reused for several distillers) keeps
    no hook that stores activations, as the taps remove their hooks when collected.

    Copied or pickled, it takes its taps along (:meth:`__reduce__`): a distiller saved
    whole comes back with working taps, while a model copied or saved on its own comes back
    with copied taps that nothing holds, which are collected and remove their hooks."""

    def __init__(self, taps: FeatureTaps | None, name: str, index: int | None) -> None:
        self.taps_ref = _no_taps if taps is None else weakref.ref(taps)
        self.name, self.index = name, index

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        taps = self.taps_ref()
        if taps is None or not taps._active:
            return
        value = first_tensor(output, self.index)
        if taps._probing is not None:  # which taps ran, how often, at which tensor version
            taps._probing.setdefault(self.name, []).append(value._version)
        taps._store[self.name] = value

    def __reduce__(self) -> tuple:
        # the taps themselves, not the (unpicklable) weak reference: a deep copy or a pickle
        # copies them once, through its memo, together with the model they hook
        return (_Capture, (self.taps_ref(), self.name, self.index))


class FeatureTaps:
    """Forward hooks that capture named intermediate outputs of ``model``.

    Calling the taps runs the model and returns ``(output, features)``, where ``features``
    maps each tap name to its tensor (``"logits"`` to the model output, or to the element of
    it that ``output`` selects: see :func:`select_output`). ``probe`` runs one
    forward pass on an example batch and records each tap's shape without the batch
    dimension, so that adapters can be sized before training. A single dict argument (a
    batch of named inputs, ``{"input_ids": ..., "attention_mask": ...}``) is passed to the
    model as keyword arguments, as everywhere in flowdistill.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] = (LOGITS,),
        output: int | str | None = None,
    ) -> None:
        check_output(output, "output")
        self.model = model
        self.output = output
        self.returns_several = False  # whether the probed model returned several tensors
        self.names = list(dict.fromkeys(names))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._store: dict[str, torch.Tensor] = {}
        self._probing: dict[str, list[int]] | None = None  # set during probe()
        self._active = False  # whether a call of the taps is running the model
        self._handles = []
        for name in self.names:
            if not isinstance(name, str):
                raise TapError(
                    f"a tap is a module path (a string), got {name!r} of type "
                    f"{type(name).__name__} (in a YAML config, quote a numeric path: '{name}')"
                )
            if name == LOGITS:
                continue
            match = _INDEX.match(name)
            if match is None:
                raise TapError(f"cannot parse tap {name!r}; expected 'module.path' or 'path[i]'")
            path, index = match["path"], match["index"]
            module = resolve_module(model, path)
            if getattr(module.forward, "__func__", None) is nn.Module.forward:  # a container
                raise TapError(_container_message(name, path, index, module))
            hook = _Capture(self, name, None if index is None else int(index))
            self._handles.append(module.register_forward_hook(hook))

    def __call__(self, *inputs: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        self._store.clear()  # (one dict, filled in place: torch.compile traces the hooks)
        self._active = True  # the model run by itself leaves nothing in the store
        try:
            if len(inputs) == 1 and not kwargs and isinstance(inputs[0], Mapping):
                output = self.model(**inputs[0])  # a dict of inputs: keyword arguments
            else:
                output = self.model(*inputs, **kwargs)
        finally:
            self._active = False
        features = dict(self._store)
        if self._probing is not None:  # what the model returns, for messages
            self.returns_several = not isinstance(output, torch.Tensor)
        if LOGITS in self.names:
            features[LOGITS] = select_output(output, self.output)
        missing = [n for n in self.names if n not in features]
        if missing:
            raise TapError(f"taps {missing} were not reached by the forward pass")
        self._store.clear()
        return output, features

    @torch.no_grad()
    def probe(self, *example: Any, **kwargs: Any) -> dict[str, tuple[int, ...]]:
        """Run one forward pass in eval mode and record every tap's per-sample shape."""
        was_training = self.model.training
        self.model.eval()
        self._probing = {}
        try:
            _, features = self(*example, **kwargs)
            runs = self._probing
        finally:
            self.model.train(was_training)
            self._probing = None
        for name, versions in runs.items():
            self._check_capture(name, versions, features[name])
        self.shapes = {name: tuple(features[name].shape[1:]) for name in self.names}
        return dict(self.shapes)

    def _check_capture(self, name: str, versions: list[int], value: torch.Tensor) -> None:
        """A tap must hold what its module returned: the module runs once per forward pass
        and its output is not changed in place afterwards."""
        model = type(self.model).__name__
        if len(versions) > 1:
            raise TapError(
                f"tap {name!r}: the module runs {len(versions)} times in one forward pass of "
                f"{model} (a module reused, such as one activation for several layers), so "
                "the tap would hold its last output only; tap a module that runs once"
            )
        if value._version != versions[0]:
            raise TapError(
                f"tap {name!r}: its output is changed in place later in the forward pass of "
                f"{model} (by an in-place operation such as ReLU(inplace=True)), so the tap "
                "would hold the changed values; tap the module that changes it, or make that "
                "operation out of place"
            )

    def remove(self) -> None:
        """Detach every hook from the model (before ``torch.jit.script(model)``, say); the
        taps capture nothing afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.remove()
        except Exception:
            pass


def _container_message(name: str, path: str, index: str | None, module: nn.Module) -> str:
    """Why a tap on a container module (a ``ModuleList``, ``ModuleDict``) is refused, with
    the paths of its elements to tap instead."""
    kind = type(module).__name__
    children = [f"{path}.{child}" if path else child for child, _ in module.named_children()]
    listed = isinstance(module, nn.ModuleList) and index is not None
    if listed and -len(children) <= int(index) < len(children):
        hint = f"to tap its element {index}, use the module path {children[int(index)]!r}"
    else:
        hint = "tap one of its elements: " + ", ".join(map(repr, children[:5]))
        hint += ", ..." if len(children) > 5 else ""
    what = " (a bracket picks an element of a module's output)" if index is not None else ""
    return (
        f"tap {name!r}: {path!r} is a {kind}, a container that the model never calls, so a "
        f"hook on it never runs{what}; {hint}"
    )

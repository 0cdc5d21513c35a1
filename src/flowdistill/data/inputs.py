"""A batch of model inputs: one tensor, or a dict of tensors passed as keyword arguments.

Most models take one tensor (images ``(B, C, H, W)``, token ids ``(B, T)``). A language
model fed padded sequences also takes an attention mask, and a Hugging Face model takes
its inputs by name: ``model(input_ids=..., attention_mask=...)``. flowdistill accepts
either form wherever it takes inputs (``Split.x``, ``example_input``, a distiller's
``forward``/``predict``): a ``dict`` of tensors is passed to the model as keyword
arguments. Every tensor of such a dict holds one row per sample (the same first
dimension), and a batch takes the same rows of each.

>>> import torch
>>> x = {"input_ids": torch.arange(6).view(3, 2), "attention_mask": torch.ones(3, 2)}
>>> num_rows(x), take(x, torch.tensor([2]))["input_ids"].tolist()
(3, [[4, 5]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import torch
from torch import nn

from ..errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "Inputs",
    "call_model",
    "check_inputs",
    "device_of",
    "input_mask",
    "input_segments",
    "input_tensors",
    "move",
    "num_rows",
    "take",
    "token_ids",
]

Inputs: TypeAlias = torch.Tensor | Mapping[str, torch.Tensor]

IGNORE_INDEX = -100  # a target that is not counted (padding), as in F.cross_entropy

#: the entries of a dict of inputs that hold the token ids and mark the real tokens (1) and
#: the padding (0), by Hugging Face's names
TOKEN_IDS, ATTENTION_MASK = "input_ids", "attention_mask"


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a dict of inputs, ``model(inputs)`` for a tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def check_inputs(inputs: Any, what: str) -> Inputs:
    """``inputs`` as fit takes them, or :class:`DataError` naming ``what`` and the problem: a
    tensor, or a non-empty dict of tensors (string keys) with one row per sample each."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    if not isinstance(inputs, Mapping):
        raise DataError(
            f"{what} must be a tensor or a dict of tensors (passed to the model as keyword "
            f"arguments), got {type(inputs).__name__}"
        )
    if not inputs:
        raise DataError(f"{what} is an empty dict: it names no input of the model")
    for key, value in inputs.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataError(
                f"{what}: a dict of inputs maps argument names (str) to tensors; entry "
                f"{key!r} is a {type(value).__name__}"
            )
        if value.ndim == 0:
            raise DataError(f"{what}[{key!r}] is a scalar; every entry holds one row per sample")
    lengths = {key: len(value) for key, value in inputs.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(
            f"{what}: every entry of a dict of inputs holds one row per sample, but their "
            f"lengths differ: {lengths}"
        )
    return dict(inputs)


def input_tensors(inputs: Inputs) -> dict[str, torch.Tensor]:
    """The tensors of ``inputs`` by name (``""`` for a single tensor)."""
    return dict(inputs) if isinstance(inputs, Mapping) else {"": inputs}


def num_rows(inputs: Inputs) -> int:
    """The number of samples in ``inputs``."""
    return len(next(iter(input_tensors(inputs).values())))


def take(inputs: Inputs, index: Any) -> Inputs:
    """The rows ``index`` (a slice or index tensor) of every tensor of ``inputs``."""
    if isinstance(inputs, Mapping):
        return {key: value[index] for key, value in inputs.items()}
    return inputs[index]


def move(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """``inputs`` on ``device``."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)


def device_of(inputs: Inputs) -> torch.device:
    """The device of ``inputs`` (of its first tensor)."""
    return next(iter(input_tensors(inputs).values())).device


def token_ids(inputs: Inputs) -> torch.Tensor | None:
    """The token ids of integer inputs: the tensor itself, or a dict's ``"input_ids"``;
    ``None`` for other inputs (images, embeddings)."""
    ids = inputs.get(TOKEN_IDS) if isinstance(inputs, Mapping) else inputs
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        return None
    return ids


def input_mask(inputs: Inputs) -> torch.Tensor | None:
    """The real tokens of a padded batch: a dict's ``"attention_mask"`` ``(B, T)`` as
    booleans; ``None`` for other inputs."""
    mask = inputs.get(ATTENTION_MASK) if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None
    return mask.bool()


def input_segments(inputs: Inputs) -> torch.Tensor | None:
    """The documents of a batch's rows, ``(B, T)`` integers: equal within one document,
    0 at padding. A dict's ``position_ids`` start a document wherever they restart at 0 (rows
    that pack several documents, as Hugging Face's flattening collator writes them), and
    its ``attention_mask`` marks the padding; with the mask alone each row is one document.
    ``None`` for other inputs."""
    if not isinstance(inputs, Mapping):
        return None
    return segments(inputs.get(ATTENTION_MASK), inputs.get("position_ids"))


def segments(mask: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`input_segments` from an attention mask and position ids (either may be
    ``None``; ``None`` when both are)."""
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2:
        return None if mask is None else (mask != 0).long()
    seg = (positions == 0).long().cumsum(-1) + 1  # a new document where positions restart
    return seg if mask is None else seg * (mask != 0)

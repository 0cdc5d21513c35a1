"""Small shared helpers for time handling (private)."""

from __future__ import annotations

import torch
from torch import Tensor

TimeLike = float | Tensor


def as_batch_time(t: TimeLike, x: Tensor) -> Tensor:
    """Return ``t`` as a tensor of shape ``(B,)`` on ``x``'s device and dtype.

    ``t`` may be a python number, a 0-d tensor, a ``(1,)`` tensor or a ``(B,)`` tensor,
    where ``B = x.shape[0]``.
    """
    if x.ndim < 1:
        raise ValueError("x must have a leading batch dimension")
    batch = x.shape[0]
    if isinstance(t, Tensor):
        t = t.to(device=x.device, dtype=x.dtype)
    else:
        t = torch.full((), float(t), device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        return t.expand(batch)
    if t.ndim == 1 and t.shape[0] in (1, batch):
        return t.expand(batch)
    raise ValueError(
        f"t must be a python float, a 0-d tensor or a tensor of shape ({batch},); "
        f"got shape {tuple(t.shape)}"
    )


def broadcast_time(t: TimeLike, x: Tensor) -> Tensor:
    """Return ``t`` reshaped to ``(B, 1, ..., 1)``, broadcasting over ``x``'s trailing dims."""
    t = as_batch_time(t, x)
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))

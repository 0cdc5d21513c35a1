"""Checks that read a tensor's values, only where reading them is free.

Reading a value of a tensor on an accelerator (``int(t.max())``, ``bool(...)``) makes the host
wait for every queued kernel, and under ``torch.compile`` it splits the graph. The library's
training steps therefore check values only on CPU tensors outside compilation; on a GPU an
out-of-range index is still caught, by the kernel that uses it (a device-side assert).
"""

from __future__ import annotations

import torch

from .errors import ValueRangeError

__all__ = ["check_index_range", "values_readable"]


def values_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read without waiting for a device or breaking a
    compiled graph: a CPU tensor, outside ``torch.compile`` tracing."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_index_range(index: torch.Tensor, high: int, message: str) -> None:
    """Raise :class:`~flowdistill.errors.ValueRangeError` (a ``ValueError``) with
    ``message`` when an entry of ``index`` lies outside ``[0, high)``; checked only where
    :func:`values_readable` (see the module's documentation)."""
    if index.numel() and values_readable(index):
        low, top = int(index.min()), int(index.max())
        if low < 0 or top >= high:
            raise ValueRangeError(f"{message} (got {low} to {top})")

"""How close a training step comes to its compute floor.

The *compute floor* of distilling a teacher into a student is the arithmetic no method can
skip: the teacher's forward pass and the student's forward and backward passes. Its time on
a device is its FLOP count over the device's peak rate; a method's measured step time over
that floor time says how much of the step is the method's module and how much is overhead
(kernel launches, host waits, memory traffic).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.inputs import call_model
from ..taps import LOGITS

__all__ = ["PEAK_BF16_FLOPS", "count_flops", "peak_flops", "step_flops"]

#: Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of
#: ``torch.cuda.get_device_name()``; the first match wins.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name``, or ``None`` when unknown."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def count_flops(fn, *args: Any, **kwargs: Any) -> int:
    """Floating-point operations of ``fn(*args, **kwargs)`` (forward and any backward it
    runs), counted by PyTorch's operator-level counter (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def step_flops(distiller, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """FLOPs of one training step of ``distiller`` on a batch, and of its compute floor.

    ``step``: the distiller's forward (teacher, student and its modules) and backward;
    ``floor``: the teacher's forward plus the student's forward and backward alone.
    Gradients the count leaves behind are cleared."""
    was_training = distiller.training
    distiller.train()

    def step() -> None:
        distiller(inputs, targets)["loss"].backward()

    def floor() -> None:
        if distiller.teacher is not None:
            with torch.no_grad():
                call_model(distiller.teacher, inputs)
        logits = distiller.student_taps(inputs)[1][LOGITS]
        torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten()).backward()

    counts = {"step": count_flops(step), "floor": count_flops(floor)}
    for p in distiller.parameters():
        p.grad = None
    distiller.train(was_training)
    return counts

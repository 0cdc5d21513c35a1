r"""Distillation losses between two multi-scale flows of the same image shape and levels.

The teacher may have more steps per level and wider conditioners than the student; the
losses compare what both flows share, level by level:

* :func:`intermediate_latent_kd` -- the activations ``h_l`` at the end of each level
  (before the factor-out), for the same input;
* :func:`final_latent_kd` -- the base latents ``eps`` (the point each flow maps the input
  to; equal latents mean the student's inverse reproduces the teacher's samples);
* :func:`synthesized_kd` -- teacher samples ``y~ = teacher.decode(eps)``, ``eps`` drawn
  from the teacher's base at a temperature, supervise the student: its latents of ``y~``
  should be the teacher's (``target="latent"``), or its inverse of the teacher's latents
  should be ``y~`` (``target="sample"``).

Every loss is a mean squared error per element, so it is zero when student equals teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ShapeMismatchError
from .model import FlowOutput, MultiScaleFlow

__all__ = ["check_pair", "final_latent_kd", "intermediate_latent_kd", "synthesized_kd"]


def check_pair(student: MultiScaleFlow, teacher: MultiScaleFlow) -> None:
    """Raise :class:`ShapeMismatchError` unless the two flows align level by level."""
    if student.image_shape != teacher.image_shape or student.num_levels != teacher.num_levels:
        raise ShapeMismatchError(
            f"flow distillation needs the same image shape and levels: student "
            f"{student.image_shape} with {student.num_levels} levels, teacher "
            f"{teacher.image_shape} with {teacher.num_levels} levels"
        )


def _mse_lists(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    # mean over every element of every level: levels weigh by their size
    if len(student) != len(teacher):
        raise ShapeMismatchError(f"{len(student)} student levels vs {len(teacher)} teacher levels")
    total = sum(F.mse_loss(s, t, reduction="sum") for s, t in zip(student, teacher, strict=True))
    return total / sum(t.numel() for t in teacher)


def intermediate_latent_kd(student: FlowOutput, teacher: FlowOutput) -> Tensor:
    """Mean squared error between the per-level activations ``h_l`` of the two flows."""
    return _mse_lists(student.levels, [t.detach() for t in teacher.levels])


def final_latent_kd(student: FlowOutput, teacher: FlowOutput) -> Tensor:
    """Mean squared error between the base latents ``eps`` of the two flows."""
    return _mse_lists(student.noise, [t.detach() for t in teacher.noise])


def synthesized_kd(
    student: MultiScaleFlow,
    teacher: MultiScaleFlow,
    n: int,
    temperature: float = 0.7,
    target: str = "latent",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Synthesized-sample KD on ``n`` teacher samples at ``temperature``.

    The samples are clamped to ``[0, 1]`` (a valid image) and re-encoded by the teacher, so
    the pair ``(y~, eps)`` is exactly consistent under the teacher.  ``target="latent"``:
    MSE between the student's latents of ``y~`` and ``eps``; ``target="sample"``: MSE
    between the student's decoding of ``eps`` and ``y~``.
    """
    if target not in ("latent", "sample"):
        raise ConfigError(f"target must be 'latent' or 'sample', got {target!r}")
    with torch.no_grad():
        y = teacher.sample(n, temperature, generator).clamp(0.0, 1.0)
        eps = teacher.encode(y).noise
    if target == "latent":
        return _mse_lists(student.encode(y).noise, eps)
    return F.mse_loss(student.decode(eps), y)

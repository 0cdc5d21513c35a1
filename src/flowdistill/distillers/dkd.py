"""Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

This module also holds :func:`warmup_length`, the linear warm-up of a KD term scaled to the
run's length, shared with ``nd``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..errors import ConfigError
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = ["DKD", "warmup_length"]


def warmup_length(epochs: int, warmup_epochs: float, reference_epochs: int | None) -> float:
    """Warm-up length in epochs for a run of ``epochs``: ``warmup_epochs`` of a
    ``reference_epochs``-epoch run (the authors' schedule), shortened in proportion for a
    shorter run and never longer than ``warmup_epochs``; ``reference_epochs=None`` keeps
    ``warmup_epochs`` as it is."""
    if reference_epochs is None or epochs >= reference_epochs:
        return float(warmup_epochs)
    return float(warmup_epochs) * epochs / reference_epochs


def check_warmup(name: str, warmup_epochs: float, reference_epochs: int | None) -> None:
    if warmup_epochs < 0:
        raise ConfigError(f"{name}: warmup_epochs must be >= 0, got {warmup_epochs}")
    if reference_epochs is not None and reference_epochs < 1:
        raise ConfigError(
            f"{name}: reference_epochs must be positive or None, got {reference_epochs}"
        )


@register("dkd")
class DKD(Distiller):
    """DKD (Zhao et al., CVPR 2022): cross-entropy plus decoupled TCKD and NCKD terms.

    The loss is :func:`flowdistill.losses.dkd`, ``T² (alpha·TCKD + beta·NCKD)`` with the
    authors' defaults ``alpha = 1``, ``beta = 8``, ``temperature = 4`` and cross-entropy
    weight 1 (mdistiller's CIFAR-100 configuration). The DKD term is warmed up linearly: in
    the engine's (0-based) epoch ``e`` it is scaled by ``min((e + 1) / W, 1)`` (mdistiller
    counts epochs from 1), where ``W = warmup_epochs = 20`` for a run of
    ``reference_epochs = 240`` epochs or more and ``W = 20 · epochs / 240`` for a shorter
    one (:func:`warmup_length`); ``reference_epochs=None`` keeps ``W = warmup_epochs`` and
    ``warmup_epochs=0`` turns the warm-up off. Outside the engine (no ``on_epoch_start``
    call) the term is not scaled.
    """

    masks_padding = True

    tune_grid = {"temperature": [1.0, 4.0], "beta": [2.0, 8.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 20.0,
        reference_epochs: int | None = 240,
        ce_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"dkd: temperature must be positive, got {temperature}")
        check_warmup("dkd", warmup_epochs, reference_epochs)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.warmup_epochs = float(warmup_epochs)
        self.reference_epochs = reference_epochs
        #: the current warm-up factor of the DKD term (1 until ``on_epoch_start``)
        self.warmup = 1.0

    def epoch_schedule(self, epoch: int, epochs: int) -> dict[str, float]:
        length = warmup_length(epochs, self.warmup_epochs, self.reference_epochs)
        return {"warmup": 1.0 if length <= 0 else min((epoch + 1) / length, 1.0)}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.warmup = self.epoch_schedule(epoch, epochs)["warmup"]

    def diagnostics(self) -> dict[str, float]:
        return {"dkd_warmup": self.warmup}

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_logits = self.student_forward(inputs)[LOGITS]
        mask = self.token_mask(targets)  # padding left out (None for class labels)
        dkd = losses.dkd(s_logits, t_logits, targets, self.alpha, self.beta, self.temperature, mask)
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "dkd": self.warmup * dkd,
            }
        )

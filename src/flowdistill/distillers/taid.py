"""Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models" (ICLR 2025)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import losses
from ..engine import distributed
from ..errors import ConfigError
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = ["TAID"]


@register("taid")
class TAID(Distiller):
    """TAID (Shing et al., ICLR 2025): KL to an adaptive student→teacher interpolation.

    The interpolation weight ``t`` grows adaptively from ``t_start`` to ``t_end``.

    The loss is :func:`flowdistill.losses.taid`, the KL from
    ``p_t = softmax((1 - t)·stopgrad(z_s) + t·z_t)`` to the student. After every training
    step, ``t`` is updated as in the authors' code: with ``L`` the step's distillation
    cross-entropy (``-Σ p_t log q``, the value their code monitors), the relative change
    ``r = (L_prev - L) / L_prev`` feeds a momentum ``m ← beta·m + (1 - beta)·r``, and

    ``t ← min(t_end, max(t_start + (t_end - t_start)·progress, t + alpha·sigmoid(m)·(1 - t)))``

    where ``progress`` is the fraction of the run's training samples seen so far (from
    ``on_fit_start``/``on_epoch_start``; 0 outside the engine). ``t`` never decreases and
    stays in ``[t_start, t_end]``; it, ``m`` and ``L_prev`` are saved in checkpoints.
    Defaults are the authors': ``t_start = 0.4``, ``t_end = 1``, ``alpha = 5e-4``,
    ``beta = 0.99``, ``adaptive = True`` (``False``: the linear schedule alone), and
    distillation weight 1 with cross-entropy weight 0 (their ``distil_ratio = 1``).
    """

    masks_padding = True

    tune_grid = {"t_start": [0.2, 0.4], "ce_weight": [0.0, 1.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
        taid_weight: float = 1.0,
        ce_weight: float = 0.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if not (0.0 <= t_start < 1.0 and 0.0 < t_end <= 1.0 and t_start <= t_end):
            raise ConfigError(
                f"taid: need 0 <= t_start < 1, 0 < t_end <= 1 and t_start <= t_end, "
                f"got t_start={t_start}, t_end={t_end}"
            )
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta < 1.0:
            raise ConfigError(f"taid: need 0 <= alpha <= 1 and 0 <= beta < 1, got {alpha}, {beta}")
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.adaptive = bool(adaptive)
        self.taid_weight = float(taid_weight)
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float32))
        self.register_buffer("prev_loss", torch.tensor(math.inf, dtype=torch.float32))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float32))
        self._num_samples: int | None = None
        self._epoch, self._epochs, self._seen = 0, None, 0
        self._seen_all: torch.Tensor | None = None

    # ------------------------------------------------------------------ schedule
    def on_fit_start(self, num_train_samples: int) -> None:
        self._num_samples = int(num_train_samples)

    def epoch_schedule(self, epoch: int, epochs: int) -> dict[str, float]:
        """The run fractions at the epoch's start and end (the interpolation's schedule
        follows the fraction step by step)."""
        if not epochs or self.t_start == self.t_end:  # (no floor that moves with the run)
            return {}
        return {
            "progress_from": min(epoch / epochs, 1.0),
            "progress_to": min((epoch + 1) / epochs, 1.0),
        }

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self._epoch, self._epochs, self._seen = int(epoch), int(epochs), 0
        self._seen_all = None  # data-parallel: every process's samples, on the device

    def progress(self) -> float:
        """Fraction of the run's training samples seen before the current step."""
        if not self._num_samples or not self._epochs:
            return 0.0
        done = self._epoch * self._num_samples + self._seen
        return min(done / (self._epochs * self._num_samples), 1.0)

    @torch.no_grad()
    def update_t(self, loss: float | torch.Tensor, progress: float) -> float:
        """One step of the authors' adaptive update from this step's loss ``loss`` at run
        fraction ``progress``; returns the new ``t`` (read from the device: a training step
        calls :meth:`step_t`, which does not wait for it)."""
        self.step_t(torch.as_tensor(loss, dtype=torch.float32, device=self.t.device), progress)
        return float(self.t)

    @torch.no_grad()
    def step_t(self, loss: torch.Tensor, progress: float | torch.Tensor) -> None:
        """:meth:`update_t` in tensor operations on the device, nothing read back: the first
        step only records the loss; then the momentum of the relative loss change moves ``t``
        up by ``alpha * sigmoid(momentum) * (1 - t)``, never below the linear schedule at
        ``progress`` nor above ``t_end`` (or ``t`` follows the schedule, not adaptive)."""
        loss = loss.detach().float().reshape(())
        first = torch.isinf(self.prev_loss)
        prev = torch.where(first, loss, self.prev_loss)
        relative = (prev - loss) / (prev + 1e-15)
        momentum = self.beta * self.momentum + (1.0 - self.beta) * relative
        progress = torch.as_tensor(progress, dtype=self.t.dtype, device=self.t.device)
        target = self.t_start + (self.t_end - self.t_start) * progress.clamp(0.0, 1.0)
        if self.adaptive:
            step = self.alpha * torch.sigmoid(momentum) * (1.0 - self.t)
            t = torch.maximum(self.t + step, target).clamp(max=self.t_end)
        else:
            t = target.expand_as(self.t).clone()
        self.momentum.copy_(torch.where(first, self.momentum, momentum))
        self.t.copy_(torch.where(first, self.t, t))
        self.prev_loss.copy_(loss)

    def _step_t_data_parallel(self, loss: torch.Tensor, batch: int) -> None:
        """:meth:`step_t` under data-parallel training: from the loss of the whole global
        batch (each process's loss weighted by its share) at the progress of every
        process's samples, alike in every process, as one process would step on the whole
        batch; summed on the device, nothing read back."""
        n = torch.tensor(float(batch), device=loss.device)
        total = distributed.all_reduce_sum(torch.stack([loss.float() * n, n]))
        if self._seen_all is None:
            self._seen_all = torch.zeros((), device=loss.device)
        progress = torch.zeros((), device=loss.device)
        if self._num_samples and self._epochs:
            done = self._epoch * self._num_samples + self._seen_all
            progress = done / (self._epochs * self._num_samples)
        self.step_t(total[0] / total[1], progress)
        self._seen_all = self._seen_all + total[1]

    def diagnostics(self) -> dict[str, float]:
        return {"taid_t": float(self.t)}

    # ------------------------------------------------------------------ training
    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_logits = self.student_forward(inputs)[LOGITS]
        t = self.t.clone()  # 0-d on the device; the schedule below updates the buffer
        mask = self.token_mask(targets)  # padding left out (None for class labels)
        kl = losses.taid(s_logits, t_logits, t, mask)
        if self.training:
            with torch.no_grad():
                p_t = losses.taid_target(s_logits, t_logits, t).flatten(0, -2)
                entropy = -torch.xlogy(p_t, p_t).sum(dim=-1)
                entropy = entropy.mean() if mask is None else losses.masked_mean(
                    entropy.view(mask.shape), mask)  # fmt: skip
            loss = kl.detach() + entropy
            if distributed.world_size() > 1:
                self._step_t_data_parallel(loss, targets.shape[0])
            else:
                self.step_t(loss, self.progress())
                self._seen += int(targets.shape[0])
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "taid": self.taid_weight * kl,
            }
        )

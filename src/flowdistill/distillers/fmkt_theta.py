r"""FM-KT Θ: FM-KT whose implicit ensemble is distilled back into the plain student, so that
inference costs nothing extra (Shao et al., "Precise Knowledge Transfer via Flow Matching",
arXiv:2402.02012, 2024, the lightweight variant :math:`\mathrm{FM\text{-}KT}^{\Theta}`).

Training is logit-mode :class:`~flowdistill.distillers.fmkt.FMKT` (the meta-encoder flow on
the student's logits, a metric loss against the teacher and cross-entropy at every Euler
step) plus one more term: the student's own output :math:`z_s` — the Θ head, the classifier
that is deployed — is trained toward the (detached) ensemble of the step predictions
:math:`\bar y = \frac1N\sum_k \hat y_k`,

.. math:: \mathcal{L}_\Theta = \lambda_\Theta \big(\mathcal{L}_\mathrm{metric}(z_s,
          \mathrm{sg}(\bar y)) + \mathrm{CE}(z_s, \text{label})\big).

At inference the student runs alone: no meta-encoder, no extra parameter or step. With
``head_tap`` (the authors' form) the flow runs on the student's feature there and a learned
head gives each step's logits, while the student's own classifier, reading the same
feature, is the Θ head: the authors' separate copy of the head, deployed alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..taps import LOGITS
from .fmkt import FMKT, draw_steps
from .registry import register

__all__ = ["FMKTTheta"]


@register("fmkt_theta")
class FMKTTheta(FMKT):
    """FM-KT Θ: FM-KT's step ensemble distilled into the plain student (no flow at inference).

    Logit-mode FM-KT plus a metric + cross-entropy loss pulling the student's own logits
    toward the detached mean of the flow's step predictions; the deployed predictor is the
    student alone (see this module's documentation)."""

    # (no inference_steps: the deployed student never runs the flow, and training draws its
    # steps from train_steps)
    tune_grid = {"fm_weight": [1.0, 2.0], "theta_weight": [1.0, 2.0]}

    def __init__(self, teacher, student, *, theta_weight: float = 1.0, **options: Any) -> None:
        tap = options.get("tap", LOGITS)
        if tap != LOGITS:
            raise ConfigError(
                f"fmkt_theta distils the logit ensemble into the student; tap must be "
                f"'logits', got {tap!r} (use fmkt for serial feature insertion)"
            )
        super().__init__(teacher, student, **options)
        self.theta_weight = float(theta_weight)

    def deployed_modules(self) -> list[nn.Module]:
        """The student alone: the Θ head is the student's own classifier."""
        return [self.student]

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_out = self.student_forward(inputs)
        s_logits = s_out[LOGITS]
        steps = draw_steps(self.train_steps) if self.training else self.inference_steps
        preds = self.step_logits(s_out, inputs, steps, targets)
        mask = self.token_mask(targets)  # padding left out (None for class labels)
        fm = torch.stack([self._metric(p, t_logits, targets, mask) for p in preds]).mean()
        ce = torch.stack([self.cross_entropy(p, targets) for p in preds]).mean()
        if self.training:
            self._stats.add(preds)
        target = torch.stack(preds).mean(0).detach()
        theta = self.warmup_factor * self._metric(s_logits, target, targets, mask)
        theta = theta + self.cross_entropy(s_logits, targets)
        return self.total(
            {
                "ce": self.ce_weight * ce,
                "fmkt": self.fm_weight * self.warmup_factor * fm,
                "theta": self.theta_weight * theta,
            }
        )

    @torch.no_grad()
    def predict(self, inputs: Any) -> torch.Tensor:
        """The plain student's logits (the meta-encoder is not run)."""
        return self.student_taps(inputs)[1][LOGITS]

r"""OFM-KT: online FM-KT without a teacher (Shao et al., "Precise Knowledge Transfer via Flow
Matching", arXiv:2402.02012, 2024, the online variant).

The meta-encoder flow of :mod:`.fmkt` runs on the student's logits :math:`s` exactly as in
logit-mode FM-KT (``N`` unrolled Euler steps, a logit prediction :math:`\hat y_k` at every
step), but with no teacher the target is the flow's own implicit ensemble: as in the
authors' ``OnlineFlowAlignModule``,

.. math:: \mathcal{L} = \frac1N \sum_k \Big(\mathrm{CE}_\epsilon(\hat y_k, \text{label})
          + \mathcal{L}_\mathrm{metric}\big(\hat y_k, \mathrm{sg}(\bar y)\big)\Big),
          \qquad \bar y = \frac1N \sum_k \hat y_k,

with :math:`\mathrm{CE}_\epsilon` the cross-entropy against labels smoothed by
:math:`\epsilon = 0.1` (:math:`1 - \epsilon` on the label, :math:`\epsilon / (C - 1)` on
every other class). The prediction is the ensemble :math:`\bar y` over ``inference_steps``
steps, so the meta-encoder is part of the deployed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._values import check_index_range
from ..errors import ConfigError, ShapeMismatchError
from ..losses.lm import masked_mean
from ..losses.logit import position_mask
from ..taps import LOGITS
from .base import Distiller
from .fmkt import (
    LOGIT_STEPS,
    METRICS,
    MetaFlow,
    _StepStats,
    causal_sequences,
    deployed_count,
    draw_steps,
    logit_head,
    parse_steps,
    reaching,
    step_logits,
    step_metric,
    take_head_tap,
)
from .registry import register

__all__ = ["OFMKT", "smoothed_cross_entropy"]


def smoothed_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Cross-entropy against labels smoothed as the authors' code: :math:`1 - \epsilon` on
    the label and :math:`\epsilon / (C - 1)` on each other class (``logits`` ``(B, C)`` or
    ``(B, T, C)``, classes last), averaged over the positions where ``mask`` (the targets'
    shape) is true, or over all."""
    rows = logits.flatten(0, -2)
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeMismatchError(
            f"smoothed_cross_entropy: targets {tuple(targets.shape)} must have the logits' "
            f"leading shape {tuple(logits.shape[:-1])}"
        )
    keep = position_mask("smoothed_cross_entropy", mask, logits)
    labels = targets.reshape(-1).long()
    if keep is not None:
        labels = torch.where(keep, labels, 0)  # any class: not counted
    classes = rows.shape[-1]
    check_index_range(labels, classes, f"ofmkt: class indices must lie in [0, {classes})")
    soft = torch.full_like(rows, smoothing / max(classes - 1, 1))
    soft.scatter_(-1, labels[:, None], 1.0 - smoothing)
    per_row = -(soft * F.log_softmax(rows, dim=-1)).sum(dim=-1)
    return masked_mean(per_row, keep)


@register("ofmkt")
class OFMKT(Distiller):
    """OFM-KT: online FM-KT with no teacher; the flow's step ensemble is its own target.

    The meta-encoder flow on the student's logits, trained at every Euler step with
    label-smoothed cross-entropy and a metric loss toward the detached mean of the step
    predictions; the prediction is that mean (see this module's documentation)."""

    masks_padding = True

    # (the loss weight, not KD's temperature: the default metric on logits is DIST, whose
    # temperature is its own, and PKD on features has none)
    tune_grid = {"inference_steps": [2, 4], "fm_weight": [1.0, 2.0]}

    uses_teacher = False
    needs_shapes = True

    def __init__(
        self,
        teacher,
        student,
        *,
        path: str = "straight",
        encoder: str = "auto",
        hidden: int | None = None,
        depth: int = 1,
        train_steps: Sequence[int] | None = None,
        inference_steps: int = 4,
        metric: str = "auto",
        fm_weight: float = 1.0,
        temperature: float = 4.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 2.0,
        dkd_warmup: int = 20,
        dist_beta: float = 2.0,
        dist_gamma: float = 2.0,
        dist_temperature: float = 1.0,
        label_smoothing: float = 0.1,
        ce_weight: float = 1.0,
        causal: bool | str = "auto",
        head_tap: str | None = None,
        **base: Any,
    ) -> None:
        head_tap = take_head_tap("ofmkt", head_tap, student, base)
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if metric not in METRICS:
            raise ConfigError(f"ofmkt: metric must be one of {METRICS}, got {metric!r}")
        if temperature <= 0 or dist_temperature <= 0 or not 0.0 <= label_smoothing < 1.0:
            raise ConfigError("ofmkt: need positive temperatures and 0 <= label_smoothing < 1")
        if int(inference_steps) < 1 or int(dkd_warmup) < 0:
            raise ConfigError("ofmkt: need inference_steps >= 1 and dkd_warmup >= 0")
        self.metric = "dist" if metric == "auto" else metric
        self.train_steps = parse_steps("ofmkt", train_steps, LOGIT_STEPS)
        self.inference_steps = int(inference_steps)
        self.fm_weight, self.label_smoothing = float(fm_weight), float(label_smoothing)
        self.metric_options = {
            "temperature": float(temperature),
            "dkd_alpha": float(dkd_alpha),
            "dkd_beta": float(dkd_beta),
            "dist_beta": float(dist_beta),
            "dist_gamma": float(dist_gamma),
            "dist_temperature": float(dist_temperature),
        }
        self.dkd_warmup = int(dkd_warmup)
        self.warmup_factor = 1.0
        self.causal = causal_sequences("ofmkt", causal, self.student_shapes[LOGITS])
        self.head_tap = head_tap
        shape = self.student_shapes[head_tap or LOGITS]
        self.flow = MetaFlow(shape, path, encoder, hidden, depth, self.causal)
        self.head = logit_head("ofmkt", head_tap, self.student_shapes)
        self._head_reach = reaching(self, head_tap, base.get("example_input"))
        self._stats = _StepStats("ofmkt")

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self._stats.reset()
        if self.metric == "dkd" and self.dkd_warmup > 0:
            self.warmup_factor = min(1.0, (epoch + 1) / self.dkd_warmup)

    def diagnostics(self) -> dict[str, float]:
        """Mean training step count and mean spread of the step predictions this epoch."""
        return self._stats.as_dict()

    def deployed_modules(self) -> list[nn.Module]:
        """The student and the meta-flow (the prediction is the flow's ensemble), with the
        learned head of ``head_tap``."""
        return [self.student, self.flow] + ([self.head] if self.head is not None else [])

    def num_deployed_params(self) -> int:
        return deployed_count(self)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        steps = draw_steps(self.train_steps) if self.training else self.inference_steps
        preds = step_logits(self, self.student_forward(inputs), inputs, steps, targets)
        if self.training:
            self._stats.add(preds)
        target = torch.stack(preds).mean(0).detach()
        mask = self.token_mask(targets)  # padding left out (None for class labels)
        ce = torch.stack(
            [smoothed_cross_entropy(p, targets, self.label_smoothing, mask) for p in preds]
        ).mean()
        options = self.metric_options
        fm = torch.stack(
            [step_metric(self.metric, p, target, targets, mask=mask, **options) for p in preds]
        ).mean()
        return self.total(
            {"ce": self.ce_weight * ce, "ofmkt": self.fm_weight * self.warmup_factor * fm}
        )

    @torch.no_grad()
    def predict(self, inputs: Any) -> torch.Tensor:
        """The mean of the flow's ``inference_steps`` step predictions."""
        s_out = self.student_taps(inputs)[1]
        return torch.stack(step_logits(self, s_out, inputs, self.inference_steps)).mean(0)

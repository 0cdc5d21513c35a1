"""Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation" (OFA-KD, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import losses
from ..adapters import _grid, feature_kind
from ..data.inputs import call_model
from ..errors import ConfigError, ShapeMismatchError
from ..taps import LOGITS
from .base import Distiller
from .nd import find_classifier
from .registry import register

__all__ = ["OFA", "SepConv", "branch_head"]

Shape = tuple[int, ...]


class SepConv(nn.Module):
    """The authors' down-sampling block: two depthwise-separable 3×3 convolutions (the
    first with stride 2), each followed by BatchNorm and ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _TokenHead(nn.Module):
    """Tokens ``(T, D)``: linear to ``dim``, one pre-norm transformer block, then the class
    token (when the tokens are a square grid plus one) or the mean token, then a linear
    classifier."""

    def __init__(self, shape: Shape, dim: int, num_classes: int) -> None:
        super().__init__()
        tokens, width = shape
        grid = _grid(tokens)
        self.cls_token = grid is not None and grid[0] == 1
        self.embed = nn.Linear(width, dim)
        heads = 4 if dim % 4 == 0 else 1
        self.block = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embed(x))
        return self.fc(x[:, 0] if self.cls_token else x.mean(dim=1))


def branch_head(shape: Shape, dim: int, num_classes: int, final_size: int) -> nn.Module:
    """A head mapping a student feature of per-sample ``shape`` to ``num_classes`` logits.

    * map ``(C, H, W)``: as the authors' CNN branches, ``k`` stride-2 :class:`SepConv`
      blocks (channels doubling, the last to ``dim``) where ``k`` halvings take ``H`` down
      to ``final_size`` (the student's last feature map), or a 1×1 convolution to ``dim``
      when ``k = 0``; then global average pooling and a linear classifier;
    * tokens ``(T, D)``: linear to ``dim``, one transformer block, class or mean token,
      linear classifier (the authors merge patches first and use ``4 - stage`` blocks);
    * vector ``(D,)``: a linear classifier.
    """
    kind = feature_kind(shape)
    if kind == "vector":
        return nn.Linear(shape[0], num_classes)
    if kind == "tokens":
        return _TokenHead(shape, dim, num_classes)
    channels, h, _ = shape
    halvings = 0
    while h > max(final_size, 1):
        h = (h + 1) // 2
        halvings += 1
    blocks: list[nn.Module] = []
    if halvings == 0:
        blocks.append(nn.Conv2d(channels, dim, 1))
    for i in range(halvings):
        out = dim if i == halvings - 1 else 2 * channels
        blocks.append(SepConv(channels, out))
        channels *= 2
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes)
    )


def _init(module: nn.Module) -> None:
    """The authors' initialisation of the branches."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def _last_map_size(model: nn.Module, example: torch.Tensor) -> int:
    """Height of the last feature map larger than 1×1 that ``model`` computes on
    ``example`` (0 when it computes none)."""
    heights: list[int] = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
            heights.append(int(out.shape[-2]))

    handles = [m.register_forward_hook(hook) for _, m in model.named_modules() if _]
    was_training = model.training
    model.eval()
    try:
        call_model(model, example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return heights[-1] if heights else 0


def _embedding_dim(model: nn.Module, num_classes: int) -> int | None:
    try:
        _, classifier = find_classifier(model, num_classes)
    except ConfigError:
        return None
    return int(classifier.in_features)


@register("ofa")
class OFA(Distiller):
    """OFA-KD (Hao et al., NeurIPS 2023): logit-space branches on student stages, OFA loss.

    Branches project intermediate student features into the logit space; each is trained,
    like the final logits, with the OFA loss towards the teacher's logits.

    Every ``student_taps`` entry (other than ``"logits"``) gets a branch head
    (:func:`branch_head`, sized from the probed shape: a map through stride-2 SepConv
    blocks down to the student's last feature map, a 1×1 convolution, pooling and a
    linear classifier; tokens through one transformer block and token pooling; a vector
    through a linear classifier). The hidden width is the larger of the student's and
    the teacher's embedding widths (their classifiers' inputs; the widest tapped feature
    when neither is found). Each branch's logits and the student's own logits are trained towards
    the teacher's logits with :func:`flowdistill.losses.ofa` (adaptive target enhancement
    exponent ``eps``, one value or one per branch plus one for the logits); only the
    teacher's logits are used, so ``teacher_taps`` is ignored. Defaults are the authors':
    ``eps = 1`` (CIFAR-100; 1.5 on ImageNet), ``temperature = 1``, and weights 1 for the
    cross-entropy, the logits' OFA term (``kd_weight``) and the branches' summed OFA terms
    (``ofa_weight``); the authors also train with label smoothing 0.1, a recipe setting
    left to the user.
    """

    tune_grid = {"temperature": [1.0, 4.0], "eps": [1.0, 1.5]}

    needs_shapes = True
    uses_feature_taps = True

    def __init__(
        self,
        teacher,
        student,
        *,
        eps: float | Sequence[float] = 1.0,
        temperature: float = 1.0,
        ofa_weight: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"ofa: temperature must be positive, got {temperature}")
        self.branch_taps = [tap for tap in self.student_tap_names if tap != LOGITS]
        if not self.branch_taps:
            raise ConfigError(
                "ofa: name the student stages to branch from with student_taps=[...] "
                "(module paths of intermediate features)"
            )
        eps_list = [float(eps)] * (len(self.branch_taps) + 1) if _is_number(eps) else list(eps)
        if len(eps_list) != len(self.branch_taps) + 1:
            raise ConfigError(
                f"ofa: eps takes one value, or one per branch plus one for the logits "
                f"({len(self.branch_taps) + 1}), got {len(eps_list)}"
            )
        if any(e <= 0 for e in eps_list):
            raise ConfigError(f"ofa: eps values must be positive, got {eps_list}")
        self.eps = [float(e) for e in eps_list]
        self.temperature = float(temperature)
        self.ofa_weight = float(ofa_weight)
        self.kd_weight = float(kd_weight)
        if len(self.student_shapes[LOGITS]) != 1:
            raise ShapeMismatchError(
                f"ofa: the student's logits have per-sample shape {self.student_shapes[LOGITS]};"
                " OFA's branches classify whole samples and need one logit vector per sample "
                "(batch, classes), not per-token logits"
            )
        num_classes = self.student_shapes[LOGITS][-1]
        example = base["example_input"]
        shapes = [self.student_shapes[tap] for tap in self.branch_taps]
        for tap, shape in zip(self.branch_taps, shapes, strict=True):
            if len(shape) not in (1, 2, 3):
                raise ShapeMismatchError(
                    f"ofa: student tap {tap!r} gives shape {shape}; a branch needs a vector, "
                    "a token sequence or a feature map"
                )
        dims = [_embedding_dim(student, num_classes), _embedding_dim(teacher, num_classes)]
        known = [d for d in dims if d is not None]
        if known:
            dim = max(known)
        else:  # no classifier found: the widest tapped feature
            dim = max(s[0] if len(s) != 2 else s[1] for s in shapes)
        final_size = _last_map_size(student, example)
        self.branches = nn.ModuleList(
            branch_head(shape, dim, num_classes, final_size) for shape in shapes
        )
        _init(self.branches)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_out = self.student_forward(inputs)
        s_logits = s_out[LOGITS]
        branch_losses = [
            losses.ofa(head(s_out[tap]), t_logits, targets, eps, self.temperature)
            for tap, head, eps in zip(self.branch_taps, self.branches, self.eps[:-1], strict=True)
        ]
        final = losses.ofa(s_logits, t_logits, targets, self.eps[-1], self.temperature)
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "kd": self.kd_weight * final,
                "ofa": self.ofa_weight * sum(branch_losses),
            }
        )


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim == 0
    return isinstance(value, int | float) and not isinstance(value, bool)

"""Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and
Direction" (arXiv:2305.17007, 2023; KD++: KD plus the ND loss).

This module also holds :func:`find_classifier`, which locates a network's classifier (the
last ``nn.Linear`` producing the logits), shared with ``ofa``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..data.inputs import call_model
from ..engine import distributed
from ..errors import ConfigError, ShapeMismatchError, TapError
from ..taps import LOGITS, resolve_module
from .base import Distiller
from .dkd import check_warmup, warmup_length
from .registry import register

__all__ = ["ND", "find_classifier"]

_CENTERS = ("running", "classifier")


def find_classifier(
    model: nn.Module, num_classes: int, path: str | None = None, who: str = "model"
) -> tuple[str, nn.Module]:
    """``(path, module)`` of ``model``'s classifier: the module at ``path`` if given, else
    the last ``nn.Linear`` (in ``named_modules`` order) with ``num_classes`` outputs."""
    if path is not None:
        return path, resolve_module(model, path)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    if not found:
        raise ConfigError(
            f"no nn.Linear with {num_classes} outputs (the classifier) in the {who} "
            f"{type(model).__name__}; name its classifier module explicitly"
        )
    return found[-1]


class _PreHook:
    """The forward pre-hook of an :class:`InputCapture`, holding it weakly (as the taps'
    hooks hold their taps): copied or pickled with the model alone, it takes a copy of its
    capture that nothing holds, which is collected and removes the copied hook, so that the
    user's model saves, copies and scripts as it would without a distiller."""

    def __init__(self, capture: InputCapture | None) -> None:
        self.ref = weakref.ref(capture) if capture is not None else _nothing

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        capture = self.ref()
        if capture is not None:
            capture._hook(module, args)

    def __reduce__(self) -> tuple:
        return (_PreHook, (self.ref(),))


def _nothing() -> None:
    return None


class InputCapture:
    """A forward pre-hook that keeps the first positional input of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(_PreHook(self))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "value": None}  # (no activation of the last forward)

    def _hook(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def take(self, what: str) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise TapError(f"the {what} was not called with a tensor in this forward")
        return value

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.handle.remove()
        except Exception:
            pass


class EmbeddingProjector(nn.Module):
    """The authors' embedding transform for a student whose embedding width differs from
    the teacher's: BatchNorm1d, Dropout(0.5), Linear (BN weight 1, biases 0). A training
    batch of one sample is normalised with the running statistics."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim_in)
        self.drop = nn.Dropout(0.5)
        self.linear = nn.Linear(dim_in, dim_out)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        use_batch = self.training and x.shape[0] > 1
        if use_batch and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x,
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=use_batch,
            momentum=bn.momentum,
            eps=bn.eps,
        )
        return self.linear(self.drop(x))


@register("nd")
class ND(Distiller):
    """KD++ (Wang et al., arXiv 2023): KD plus the ND loss on the penultimate embedding.

    Paper: "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
    (arXiv:2305.17007): cross-entropy, KD, and the norm-and-direction (ND) loss.

    The embedding is the input of each network's classifier, captured by a forward
    pre-hook: the last ``nn.Linear`` with as many outputs as classes, or the module named
    by ``student_classifier``/``teacher_classifier``; it must be ``(batch, dim)``. The
    generic ``student_taps``/``teacher_taps`` are not used (the paper fixes the feature);
    ``example_input`` is needed to size the modules. A student embedding of another width
    than the teacher's goes through the authors' projector (BatchNorm1d, Dropout 0.5,
    Linear), an extra module. The ND loss (:func:`flowdistill.losses.nd`) pulls the
    student's embedding towards the direction of the teacher's mean embedding of the
    sample's class and enlarges its norm up to the teacher's.

    The authors compute the teacher's class means over the training set before training.
    Here, with ``centers="running"`` (default), they are the running per-class means of
    the teacher's embeddings over every training batch seen so far (the current batch
    included; saved in checkpoints): partial during the first epoch, equal to the
    training-set means at every epoch end when the data are not augmented.
    ``centers="classifier"`` uses the rows of the teacher's classifier weight as class
    directions instead; :meth:`set_class_means` fixes precomputed means (the authors'
    recipe).

    Defaults are those of the authors' training script: ``nd_weight = 1``, ``kd_weight = 1``
    (their published CIFAR-100 runs set both per pair, e.g. KD 3.5 and ND 2 for resnet32x4
    → resnet8x4; the standard suites use those) at
    ``temperature = 4``, cross-entropy weight 1, and the KD term warmed up linearly as
    ``min(e / W, 1)`` in 0-based epoch ``e`` with ``W = warmup_epochs = 20`` epochs of a
    ``reference_epochs = 240`` run, shortened in proportion for a shorter run (see
    ``dkd``).
    """

    tune_grid = {"temperature": [1.0, 4.0], "nd_weight": [0.5, 1.0]}

    needs_shapes = True
    caches_teacher = False  # the teacher's embedding comes from a hook on its classifier

    def __init__(
        self,
        teacher,
        student,
        *,
        nd_weight: float = 1.0,
        kd_weight: float = 1.0,
        temperature: float = 4.0,
        centers: str = "running",
        student_classifier: str | None = None,
        teacher_classifier: str | None = None,
        warmup_epochs: float = 20.0,
        reference_epochs: int | None = 240,
        ce_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"nd: temperature must be positive, got {temperature}")
        if centers not in _CENTERS:
            raise ConfigError(f"nd: centers must be one of {', '.join(_CENTERS)}, got {centers!r}")
        check_warmup("nd", warmup_epochs, reference_epochs)
        self.nd_weight = float(nd_weight)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.centers = centers
        self.warmup_epochs = float(warmup_epochs)
        self.reference_epochs = reference_epochs
        self.warmup = 1.0
        self.num_classes = self.student_shapes[LOGITS][-1]
        _, s_cls = find_classifier(student, self.num_classes, student_classifier, "student")
        _, t_cls = find_classifier(teacher, self.num_classes, teacher_classifier, "teacher")
        self._teacher_classifier = [t_cls]  # a list keeps it out of this module's children
        self._capture = {"student": InputCapture(s_cls), "teacher": InputCapture(t_cls)}
        d_s = self._probe(student, "student", base["example_input"])
        d_t = self._probe(teacher, "teacher", base["example_input"])
        if centers == "classifier":
            weight = getattr(t_cls, "weight", None)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (
                self.num_classes,
                d_t,
            ):
                raise ShapeMismatchError(
                    f"nd: centers='classifier' needs a teacher classifier weight of shape "
                    f"({self.num_classes}, {d_t}), got "
                    f"{None if weight is None else tuple(weight.shape)}"
                )
        self.projector = EmbeddingProjector(d_s, d_t) if d_s != d_t else nn.Identity()
        self.register_buffer("class_sum", torch.zeros(self.num_classes, d_t))
        self.register_buffer("class_count", torch.zeros(self.num_classes))
        self.register_buffer("class_fixed", torch.zeros(()))

    def _probe(self, model: nn.Module, who: str, example: torch.Tensor) -> int:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                call_model(model, example)
        finally:
            model.train(was_training)
        captured = self._capture[who].value
        self._capture[who].value = None
        if captured is None:
            raise ConfigError(
                f"nd: the {who}'s classifier was not called with a tensor; name it with "
                f"{who}_classifier=<module path>"
            )
        if captured.ndim != 2:
            raise ShapeMismatchError(
                f"nd: the {who}'s embedding (its classifier's input) has per-sample shape "
                f"{tuple(captured.shape[1:])}; ND needs a (batch, dim) embedding"
            )
        return int(captured.shape[1])

    # ------------------------------------------------------------------ class means
    @torch.no_grad()
    def set_class_means(self, means: torch.Tensor) -> None:
        """Fix the teacher's class means (``(classes, dim)``), e.g. computed over the
        training set before training as the authors do; running updates stop."""
        if tuple(means.shape) != tuple(self.class_sum.shape):
            raise ShapeMismatchError(
                f"nd: class means must have shape {tuple(self.class_sum.shape)}, "
                f"got {tuple(means.shape)}"
            )
        self.class_sum.copy_(means)
        self.class_count.fill_(1.0)
        self.class_fixed.fill_(1.0)

    def class_means(self) -> torch.Tensor:
        """The ``(classes, dim)`` class centres the ND loss uses now."""
        means = self.class_sum / self.class_count.clamp_min(1.0)[:, None]
        if self.centers == "classifier":  # chosen on the device: no wait for it in a step
            weight = self._teacher_classifier[0].weight.detach().to(means.dtype)
            return torch.where(self.class_fixed.bool(), means, weight)
        return means

    @torch.no_grad()
    def _accumulate(self, t_emb: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the batch to the running class sums, unless the means were fixed (a factor
        of 0 then, computed on the device rather than read from it)."""
        y = targets.reshape(-1).long()
        live = 1.0 - self.class_fixed  # 0-d: 0 once set_class_means has fixed the centres
        if distributed.world_size() > 1:  # data-parallel: every process adds every share
            sums = torch.zeros_like(self.class_sum).index_add_(
                0, y, t_emb.to(self.class_sum.dtype) * live
            )
            counts = torch.zeros_like(self.class_count).index_add_(
                0, y, live.expand(y.shape[0]).to(self.class_count.dtype)
            )
            both = distributed.all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1))
            self.class_sum.add_(both[:, :-1])
            self.class_count.add_(both[:, -1])
            return
        self.class_sum.index_add_(0, y, t_emb.to(self.class_sum.dtype) * live)
        self.class_count.index_add_(0, y, live.expand(y.shape[0]).to(self.class_count.dtype))

    # ------------------------------------------------------------------ schedule
    def epoch_schedule(self, epoch: int, epochs: int) -> dict[str, float]:
        length = warmup_length(epochs, self.warmup_epochs, self.reference_epochs)
        return {"warmup": 1.0 if length <= 0 else min(epoch / length, 1.0)}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.warmup = self.epoch_schedule(epoch, epochs)["warmup"]

    def diagnostics(self) -> dict[str, float]:
        return {"kd_warmup": self.warmup}

    # ------------------------------------------------------------------ training
    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        t_emb = self._capture["teacher"].take("teacher's classifier").detach()
        s_logits = self.student_forward(inputs)[LOGITS]
        s_emb = self.projector(self._capture["student"].take("student's classifier"))
        if self.training and self.centers == "running":
            self._accumulate(t_emb, targets)
        kd = losses.kd(s_logits, t_logits, self.temperature)
        nd = losses.nd(s_emb, t_emb, self.class_means(), targets)
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "kd": self.warmup * self.kd_weight * kd,
                "nd": self.nd_weight * nd,
            }
        )

"""The distiller base class: a frozen teacher, a trainable student, named loss terms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._values import values_readable
from ..data.inputs import IGNORE_INDEX, input_mask, input_segments, move, num_rows, take
from ..errors import ConfigError, ShapeMismatchError
from ..losses.lm import token_cross_entropy
from ..taps import LOGITS, FeatureTaps
from .registry import get_method, list_methods

__all__ = ["IGNORE_INDEX", "Distiller", "per_token"]


class Distiller(nn.Module):
    """Base of every method: wraps the user's ``teacher`` and ``student`` modules.

    * The teacher is frozen: its parameters do not require grad, it stays in eval mode
      whatever ``train()`` is called with, and it runs under ``torch.no_grad``.
    * Features are taken by module path (``student_taps`` / ``teacher_taps``; ``"logits"``
      is the model output, or the element of it that ``student_output`` /
      ``teacher_output`` names: an index into a returned tuple, or a key). With an
      ``example_input`` batch, each tap's shape is probed once at construction
      (``self.student_shapes``, ``self.teacher_shapes``) so that subclasses can size their
      adapters before training.
    * Modules a method adds (projectors, flow networks) are its *extra* modules; their
      parameters are trained with the student and counted by :meth:`num_extra_params`.
    * ``distiller(inputs, targets)`` returns a dict of named, already weighted loss terms
      and their sum under ``"loss"``. ``predict(inputs)`` gives the logits used for
      evaluation (the student alone for most methods).
    """

    name: ClassVar[str] = ""
    #: whether the method needs a teacher at all (``student`` does not)
    uses_teacher: ClassVar[bool] = True
    #: whether the method needs probed feature shapes (and thus ``example_input``)
    needs_shapes: ClassVar[bool] = False
    #: whether the method distils the features named by ``student_taps``/``teacher_taps``;
    #: ``make_distiller`` refuses them for a method that would ignore them (``taps_hint``
    #: says what it takes instead)
    uses_feature_taps: ClassVar[bool] = False
    taps_hint: ClassVar[str] = ""
    #: whether the method needs each sample's dataset index (``self.batch_index``), e.g. a
    #: memory bank keyed by sample; the engine sets it before every training step
    uses_indices: ClassVar[bool] = False
    #: whether every term of the method leaves padded positions (token targets -100) out;
    #: a method that would count them refuses padded targets (:meth:`check_targets`)
    masks_padding: ClassVar[bool] = False
    #: whether the method reads its teacher through :meth:`teacher_forward` alone, so that
    #: the teacher's outputs on the training inputs can be computed once before training
    #: (``TrainConfig.cache_teacher_outputs``); a method that also reads it otherwise (ND's hook on
    #: the teacher's classifier) says ``False``
    caches_teacher: ClassVar[bool] = True
    #: the method's main hyper-parameters for ``flowdistill bench --tune``: option -> values
    #: (every combination is a point) or a list of option dicts; each method of the project
    #: holds four points, so that every method gets the same grid budget
    tune_grid: ClassVar[dict[str, list] | list[dict[str, Any]]] = {}

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        *,
        example_input: torch.Tensor | None = None,
        student_taps: Sequence[str] = (LOGITS,),
        teacher_taps: Sequence[str] = (LOGITS,),
        student_output: int | str | None = None,
        teacher_output: int | str | None = None,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise ConfigError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if self.uses_teacher and not isinstance(teacher, nn.Module):
            raise ConfigError(
                f"method {self.name!r} needs a teacher nn.Module, got {type(teacher).__name__}"
            )
        if isinstance(student_taps, str) or isinstance(teacher_taps, str):
            raise ConfigError("student_taps and teacher_taps are lists of module paths")
        self.student = student
        self.teacher = teacher if self.uses_teacher else None
        if self.teacher is not None:
            _refuse_shared(self.teacher, student)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.ce_weight = float(ce_weight)
        self.batch_index: torch.Tensor | None = None
        # the teacher's outputs on the training inputs, by tap (cache_teacher), and the
        # rows of the training step being taken (set by the engine around each step)
        self._teacher_rows: dict[str, torch.Tensor] | None = None
        self._teacher_index: torch.Tensor | None = None
        self.student_tap_names = list(dict.fromkeys([*student_taps, LOGITS]))
        self.teacher_tap_names = list(dict.fromkeys([*teacher_taps, LOGITS]))
        self.student_taps = FeatureTaps(student, self.student_tap_names, student_output)
        self.teacher_taps = (
            FeatureTaps(teacher, self.teacher_tap_names, teacher_output)
            if self.teacher is not None
            else None
        )
        self.student_shapes: dict[str, tuple[int, ...]] = {}
        self.teacher_shapes: dict[str, tuple[int, ...]] = {}
        if example_input is not None:
            self.student_shapes = self.student_taps.probe(example_input)
            if self.teacher_taps is not None:
                self.teacher_shapes = self.teacher_taps.probe(example_input)
            s_logits, t_logits = self.student_shapes[LOGITS], self.teacher_shapes.get(LOGITS)
            if t_logits is not None and s_logits != t_logits:
                what = (
                    "teacher and student vocabularies differ: they must share one tokenizer"
                    if len(s_logits) == 2 and s_logits[0] == t_logits[0]
                    else "teacher and student must predict the same classes"
                )
                several = [
                    f"{side}_output="
                    for side, taps in (
                        ("student", self.student_taps),
                        ("teacher", self.teacher_taps),
                    )
                    if taps.returns_several and taps.output is None
                ]
                if several:
                    what += (
                        f" (of a model that returns several tensors the first is taken as its "
                        f"logits: name another with {' / '.join(several)}<index or key>)"
                    )
                raise ShapeMismatchError(
                    f"student logits have shape {s_logits} but teacher logits {t_logits}: {what}"
                )
        elif self.needs_shapes:
            raise ConfigError(
                f"method {self.name!r} sizes its modules from probed feature shapes: "
                "pass example_input=<a batch of inputs>"
            )

    def follow_student_dtype(self) -> Distiller:
        """Give the method's own modules (adapters, flows) the floating dtype of the
        student's parameters, so that a float64 (or bf16) student trains with modules of its
        precision; ``make_distiller`` calls it. The teacher is left as it is."""
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), None)
        if dtype is None:
            return self
        for module in self.children():
            if module is not self.student and module is not self.teacher:
                module.to(dtype)
        return self

    # ------------------------------------------------------------------ modes and params
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the method adds beyond the student's own."""
        own = {id(p) for p in self.student.parameters()}
        if self.teacher is not None:
            own |= {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    def num_extra_params(self) -> int:
        """Number of scalar parameters in the method's extra modules."""
        return sum(p.numel() for p in self.extra_parameters())

    def deployed_modules(self) -> list[nn.Module]:
        """Modules :meth:`predict` runs at inference: the student alone unless a method
        keeps some of its modules in the deployed model (serial insertion, say)."""
        return [self.student]

    def num_deployed_params(self) -> int:
        """Scalar parameters of the deployed predictor (each shared tensor counted once)."""
        seen = {id(p): p for m in self.deployed_modules() for p in m.parameters()}
        return sum(p.numel() for p in seen.values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters plus the method's extra parameters (never the teacher's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of everything that trains (the frozen teacher left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    # ------------------------------------------------------------------ forward helpers
    def student_forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Student features by tap name (``"logits"`` included), with gradients."""
        return self.student_taps(inputs)[1]

    @torch.no_grad()
    def teacher_forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Teacher features by tap name, computed without gradients; in a training step
        of a run that cached them (:meth:`cache_teacher`), the cached rows of the step's
        samples."""
        if self.teacher_taps is None:
            raise ConfigError(f"method {self.name!r} has no teacher")
        rows, index = self._teacher_rows, self._teacher_index
        if rows is not None and index is not None:
            return {k: v[index] for k, v in rows.items()}
        if self.teacher.training:  # put in training mode by the caller: its BN stats stay
            self.teacher.eval()
        return {k: v.detach() for k, v in self.teacher_taps(inputs)[1].items()}

    @torch.no_grad()
    def cache_teacher(
        self, inputs: Any, batch_size: int, device: torch.device | str | None = None
    ) -> None:
        """Compute the teacher's outputs (every tap) on ``inputs`` (the training inputs,
        unchanged by augmentation) once, ``batch_size`` rows at a time moved to ``device``
        (the teacher's), in eval mode; each
        training step then reads its samples' rows (the engine gives their indices)
        instead of running the teacher. ``None`` inputs drop the cache."""
        self._teacher_rows = self._teacher_index = None
        if inputs is None:
            return
        if not self.caches_teacher:
            raise ConfigError(
                f"method {self.name!r} reads its teacher outside its taps, so the "
                "teacher's outputs cannot be cached: leave train.cache_teacher_outputs off"
            )
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, num_rows(inputs), batch_size):
            rows = take(inputs, slice(start, start + batch_size))
            out = self.teacher_forward(rows if device is None else move(rows, device))
            for name, value in out.items():
                parts.setdefault(name, []).append(value)
        self._teacher_rows = {name: torch.cat(values) for name, values in parts.items()}

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Task loss on the student's logits (class dimension last); targets equal to -100
        (padding) are not counted (:meth:`check_targets` first)."""
        self.check_targets(targets)
        if targets.ndim >= 2:  # tokens: mean over the counted ones (0 for padding alone)
            return token_cross_entropy(logits, targets, self.token_mask(targets))
        rows = logits.flatten(0, -2)  # float32 or wider, under autocast too
        return F.cross_entropy(
            rows.to(torch.promote_types(rows.dtype, torch.float32)), targets.flatten()
        )

    def check_targets(self, targets: torch.Tensor) -> None:
        """Refuse padded token targets (-100) for a method whose terms would count the
        padded positions (``masks_padding`` false). Checked where the values are free to
        read (CPU tensors outside compilation); ``fit`` checks the training targets once
        before anything trains, wherever they are."""
        if self.masks_padding or targets.ndim < 2 or not values_readable(targets):
            return
        if bool((targets == IGNORE_INDEX).any()):
            raise ConfigError(padding_refusal(self.name or type(self).__name__))

    @staticmethod
    def token_mask(targets: torch.Tensor) -> torch.Tensor | None:
        """``targets != -100`` (the positions that count) for token targets ``(B, T)``;
        ``None`` for class labels ``(B,)``, which have no padding. Computed on the targets'
        device and never read back: a training step does not wait for the device."""
        if targets.ndim < 2:
            return None
        return targets != IGNORE_INDEX

    @staticmethod
    def real_tokens(inputs: Any, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """The documents of a batch's rows, ``(B, T)`` integers, 0 at padding: from a dict
        of inputs (its ``attention_mask``, and ``position_ids`` where rows pack several
        documents: :func:`~flowdistill.data.inputs.input_segments`), else, for token
        ``targets``, one document up to the last counted position (right padding: a run of
        -100 at the end; a -100 before a counted target, a prompt left out of the loss, is a
        real token the model sees, as it does at prediction, where no targets tell padding
        apart); ``None`` otherwise. ``> 0`` marks the real tokens."""
        real = input_segments(inputs)
        if real is None and targets is not None and targets.ndim >= 2:
            counted = targets != IGNORE_INDEX
            real = counted.flip(-1).cummax(-1).values.flip(-1).long()
        return real

    def feature_mask(
        self, targets: torch.Tensor, feature: torch.Tensor, what: str, inputs: Any = None
    ) -> torch.Tensor | None:
        """:meth:`token_mask` for a feature with one vector per token, ``(B, T, D)`` for
        targets ``(B, T)``. Under class labels, the real tokens of a padded dict batch
        (its ``attention_mask``, given ``inputs``) where the feature has one vector per
        token, else ``None``. A feature of another layout under token targets is refused,
        as its padded positions could not be left out."""
        mask = self.token_mask(targets)
        if mask is None:  # class labels: a padded sequence batch's real tokens, if any
            return per_token(input_mask(inputs) if inputs is not None else None, feature)
        if mask is not None and tuple(feature.shape[:-1]) != tuple(mask.shape):
            raise ShapeMismatchError(
                f"{self.name}: {what} has shape {tuple(feature.shape)}, not one vector per "
                f"token of the targets {tuple(mask.shape)}, so its padded positions could not "
                "be left out: tap a module whose output is (batch, tokens, width)"
            )
        return mask

    @torch.no_grad()
    def predict(self, inputs: Any) -> torch.Tensor:
        """Logits used for evaluation: the student alone unless a method says otherwise."""
        return self.student_taps(inputs)[1][LOGITS]

    def on_fit_start(self, num_train_samples: int) -> None:  # noqa: B027
        """Called once by the engine before the optimizer is built (and before a resumed
        run's weights are loaded); sample-keyed state such as a memory bank is sized here."""

    def on_fit_data(self, inputs: torch.Tensor) -> None:  # noqa: B027
        """Called once by the engine with the training inputs, before anything trains: a
        method whose state was built for particular data (a cache) checks them here."""

    def on_fit_targets(self, targets: torch.Tensor) -> None:  # noqa: B027
        """Called once by the engine with the training targets (labels, or token ids),
        before anything trains: a method that samples by class (CRD's negatives) indexes
        them here."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:  # noqa: B027
        """Called by the engine before each epoch (0-based); schedules live here."""

    def epoch_schedule(self, epoch: int, epochs: int) -> dict[str, float]:
        """What the method's own schedule (a warm-up, a ramp) sets at ``epoch`` (0-based) of
        a run planned for ``epochs``, computed without side effects; empty for a method with
        no schedule or one that does not depend on the run's length. When a run is resumed
        for another number of epochs, ``fit`` compares the epochs already done under both
        plans: where they differ, the resumed run is not what a run planned so from the
        start does, and fit says so (``schedule_extended``)."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        """Extra per-epoch numbers a method wants logged (empty by default)."""
        return {}

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def total(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the sum of the weighted ``terms`` under ``"loss"``."""
        terms = dict(terms)
        terms["loss"] = sum(terms.values())
        return terms


def per_token(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``mask`` ``(B, T)`` where ``x`` has one vector per token, ``(B, T, D)``; ``None`` for
    any other layout (maps, pooled vectors), which has no padding to leave out."""
    return mask if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else None


def padding_refusal(name: str) -> str:
    """The message for a method given padded targets it cannot leave out."""
    able = [m for m in list_methods() if get_method(m).masks_padding]
    return (
        f"method {name!r} would count padded positions (targets -100) in its distillation "
        "terms: give it unpadded sequences (fixed-length windows, as the character suites "
        f"use), or use a method that leaves padding out: {', '.join(able)}"
    )


def _refuse_shared(teacher: nn.Module, student: nn.Module) -> None:
    """The teacher is frozen: a parameter it shares with the student would be frozen too."""
    ids = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if id(p) in ids]
    if shared:
        what = "the same module" if teacher is student else f"{len(shared)} parameters"
        raise ConfigError(
            f"teacher and student share {what} ({', '.join(shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''}); the teacher is frozen, so the student "
            "would be too: give the student its own copy (copy.deepcopy)"
        )

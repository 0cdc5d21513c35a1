r"""FM-KT: knowledge transfer with flow matching (Shao, Shen, Gong, Chen & Dai, "Precise
Knowledge Transfer via Flow Matching", arXiv:2402.02012, 2024; the authors' code calls it
"Knowledge Distillation via Flow Matching").

**Algorithm.** A *meta-encoder* :math:`g_\theta(x, t)` (a network with a sinusoidal time
embedding) defines a flow that carries the student's representation :math:`s` toward the
teacher's :math:`y` (``t = 0`` the student, ``t = 1`` the teacher, the convention of
:mod:`flowdistill.flows`; the student representation takes the place of the source sample,
as noise does in a diffusion sampler). Training *unrolls* the Euler solver with :math:`N`
steps, :math:`t_k = k/N`; on the straight (rectified) path, as in the authors' code, every
step predicts the teacher-side endpoint as a displacement *from the start*,

.. math::

    x_{t_0} = s, \qquad
    \hat y_k = s + g_\theta(x_{t_k}, t_k), \qquad
    x_{t_{k+1}} = x_{t_k} + g_\theta(x_{t_k}, t_k) / N,

so that the integrated :math:`x_1 = \frac1N \sum_k \hat y_k` is the mean of the step
predictions (on the VP and VE paths, extensions of this project, the encoder predicts
:math:`\hat y_k = x_{t_k} + g_\theta` and the path turns it into the velocity
:math:`\dot\alpha_t \hat y + \dot\sigma_t\,(x - \alpha_t \hat y)/\sigma_t`). The loss is
the mean over the steps of a metric-based distillation loss (KD, DKD, PKD or DIST) between
each step's prediction and the teacher,

.. math:: \mathcal{L}_\mathrm{FM} = \frac1N \sum_{k=0}^{N-1}
          \mathcal{L}_\mathrm{metric}(\hat y_k, y),

which the paper shows upper-bounds the negative log-likelihood of the teacher's
representation under the flow. :math:`N` is drawn at random each training step
(from ``{1, 2, 4, 8, 16}`` for features, fixed at 8 for logits, as the authors' code), so
that the field is accurate for any step count; inference uses 4 steps by default.
Paths: rectified flow (``"straight"``: :math:`\alpha_t = t, \sigma_t = 1 - t`), VP (cosine,
:math:`\alpha_t = \sin\frac{\pi t}2, \sigma_t = \cos\frac{\pi t}2`) and VE
(:math:`\alpha_t = 1`, :math:`\sigma_t` geometric from :math:`\sigma_{\max} = 10` to
:math:`\sigma_{\min} = 0.01`), all from :mod:`flowdistill.flows.paths`. The encoder's last
layer starts at zero, so a fresh flow predicts :math:`\hat y_k = s` on the straight path
(:math:`x_{t_k}` on the others; on the straight and VE paths it is then the identity map).

**Feature mode** (``tap`` a student module path): the flow runs in the student's feature
space; the teacher's feature at ``teacher_tap`` is projected into it (BatchNorm then a
:func:`~flowdistill.adapters.make_adapter` projection, trained with the loss, as the
authors' BN + 1×1 convolution). The flow is inserted *serially*: a forward hook replaces the
tapped module's output by the integrated :math:`x_1`, so the rest of the student computes on
the transported feature, in training and at inference (the meta-encoder is part of the
deployed model; :meth:`FMKT.predict` runs it with ``inference_steps``). The student's
cross-entropy is taken on its final logits. As in the authors' code, each step's metric
compares displacements from the tapped feature :math:`s`: the one the student needs,
:math:`s - y`, with the one the step predicts, :math:`s - \hat y_k` (with the default PKD,
a per-channel correlation, this asks for the direction of each channel's move, not its
scale).

**Logit mode** (``tap="logits"``, the default): the flow runs on the student's logits and
each step's prediction :math:`\hat y_k` is a set of logits, trained with the metric against
the teacher's logits plus cross-entropy against the labels (both averaged over the steps).
By default the meta-encoder sees the logits alone, which works with any student without
locating its classifier. The authors' logit-based module instead runs the flow on the
student's last feature map and turns each step's prediction into logits with a learned
head (global average pooling and a linear layer) that takes the place of the student's
classifier: ``head_tap=<module path>`` does that here. The flow then runs on the feature
at ``head_tap`` (a map, a vector, or a token sequence, whose head is applied per token),
:class:`LogitHead` turns each step's prediction :math:`\hat y_k` into logits, and the
student's own classifier takes no part (FM-KT Θ keeps it as its Θ head, the authors'
lightweight copy of the head, trained toward the ensemble and deployed alone).
The prediction is the mean of the step outputs, :math:`\frac1N\sum_k \hat y_k`: FM-KT is an
*implicit ensemble* over the solver's steps.

Meta-encoders (``encoder``): ``"mlp"`` (:class:`~flowdistill.flows.MLPVelocity`, per
position for maps and tokens), ``"conv"`` (:class:`~flowdistill.flows.ConvVelocity`;
vectors as 1×1 maps, tokens as a ``T×1`` map) and ``"transformer"``
(:class:`~flowdistill.flows.TokenVelocity`; maps as ``H·W`` tokens, vectors as one token);
``"auto"`` picks MLP for vectors, conv for maps and transformer for tokens. Where the student
predicts per token (logits ``(B, T, V)``, a causal language model), the flow is causal
(``causal="auto"``): the transformer attends to earlier tokens only, and ``"conv"``, which
would mix each token with the next ones, is refused; so a prediction at position :math:`i`
(the deployed ensemble or the student with the flow inserted) never reads a later token.

The variants :mod:`.fmkt_theta` (FM-KT Θ) and :mod:`.ofmkt` (online OFM-KT) reuse the pieces
defined here.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import losses
from ..adapters import ChannelNorm, feature_kind, make_adapter
from ..data.inputs import input_segments
from ..errors import ConfigError, ShapeMismatchError, TapError
from ..flows import ConvVelocity, MLPVelocity, TokenVelocity
from ..flows.paths import PATHS, AffinePath, get_path
from ..models.stages import feature_stages
from ..taps import LOGITS, resolve_module
from .base import Distiller, per_token
from .registry import register, register_variant

__all__ = [
    "ENCODERS",
    "FEATURE_STEPS",
    "FMKT",
    "LOGIT_STEPS",
    "METRICS",
    "LogitHead",
    "MetaEncoder",
    "MetaFlow",
    "step_metric",
]

Shape = tuple[int, ...]

#: meta-encoder architectures (``"auto"`` picks by feature kind)
ENCODERS = ("auto", "mlp", "conv", "transformer")
#: per-step metric losses (``"auto"``: DIST on logits, PKD on features, as the authors)
METRICS = ("auto", "kd", "dkd", "pkd", "dist")
#: training step counts of the authors' code: random for features, fixed for logits
FEATURE_STEPS = (1, 2, 4, 8, 16)
LOGIT_STEPS = (8,)
_AUTO_ENCODER = {"vector": "mlp", "map": "conv", "tokens": "transformer"}


# ---------------------------------------------------------------------------- meta-encoder
def auto_width(channels: int) -> int:
    """Default meta-encoder width: the channel count rounded up to a power of two, within
    ``[16, 256]`` (the authors' meta-encoders are as wide as the student feature)."""
    return min(256, max(16, 1 << max(int(channels) - 1, 0).bit_length()))


class MetaEncoder(nn.Module):
    """The meta-encoder ``g(x, t)``: a time-conditioned network mapping features of per-sample
    ``shape`` (vector ``(D,)``, map ``(C, H, W)`` or tokens ``(T, D)``) to the same shape,
    built from the networks of :mod:`flowdistill.flows.nets` (sinusoidal time embedding and
    FiLM conditioning, zero-initialised output layer; the authors' encoders instead add a
    linear time embedding to the input and start from a random output layer).
    :class:`MetaFlow` reads its output as a displacement (see there)."""

    def __init__(
        self,
        shape: Shape,
        encoder: str = "auto",
        hidden: int | None = None,
        depth: int = 1,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ConfigError(f"fmkt: encoder must be one of {ENCODERS}, got {encoder!r}")
        self.shape = tuple(int(s) for s in shape)
        self.kind = feature_kind(self.shape)
        self.encoder = _AUTO_ENCODER[self.kind] if encoder == "auto" else encoder
        self.causal = bool(causal) and self.kind == "tokens"
        if self.causal and self.encoder == "conv":
            raise ConfigError(
                "fmkt: encoder 'conv' mixes each token with the next ones; a causal sequence "
                "(per-token predictions) takes encoder 'mlp' (per token) or 'transformer' "
                "(causal attention)"
            )
        channels = self.shape[-1] if self.kind == "tokens" else self.shape[0]
        hidden, depth = auto_width(channels) if hidden is None else int(hidden), int(depth)
        if hidden < 1 or depth < 0:
            raise ConfigError(f"fmkt: need hidden >= 1 and depth >= 0, got {hidden}, {depth}")
        self.net: nn.Module
        if self.encoder == "mlp":
            self.net = MLPVelocity(channels, hidden=hidden, depth=depth)
        elif self.encoder == "conv":
            self.net = ConvVelocity(channels, hidden=hidden, depth=depth)
        else:
            heads = 4 if hidden % 4 == 0 else 1
            self.net = TokenVelocity(
                channels, hidden=hidden, depth=depth, heads=heads, causal=self.causal
            )

    def forward(
        self, x: torch.Tensor, t: float | torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``g(x, t)``; ``mask`` ``(B, T)`` marks the real tokens of padded sequences: no
        token attends to padding (the transformer encoder; the others act per token)."""
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        if self.encoder == "mlp":
            if self.kind == "vector":
                return self.net(x, t)
            rows = x.movedim(1, -1) if self.kind == "map" else x  # channels last
            per = rows.shape[1:-1].numel()
            out = self.net(rows.reshape(-1, rows.shape[-1]), t.repeat_interleave(per))
            out = out.reshape(rows.shape)
            return out.movedim(-1, 1) if self.kind == "map" else out
        if self.encoder == "conv":
            if self.kind == "map":
                return self.net(x, t)
            if self.kind == "vector":
                return self.net(x[:, :, None, None], t)[:, :, 0, 0]
            return self.net(x.transpose(1, 2)[..., None], t)[..., 0].transpose(1, 2)
        if self.kind == "tokens":
            return self.net(x, t, mask=mask)
        if self.kind == "vector":
            return self.net(x[:, None, :], t)[:, 0]
        tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        return self.net(tokens, t).transpose(1, 2).reshape(x.shape)


class LogitHead(nn.Module):
    """The authors' head on a feature of per-sample ``shape``: global average pooling for a
    map ``(C, H, W)``, then a linear layer to ``num_classes``; a vector ``(D,)`` goes
    straight to the linear layer, and a token sequence ``(T, D)`` gets it per token."""

    def __init__(self, shape: Shape, num_classes: int) -> None:
        super().__init__()
        self.kind = feature_kind(tuple(shape))
        width = shape[-1] if self.kind == "tokens" else shape[0]
        self.linear = nn.Linear(int(width), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "map":
            x = x.mean(dim=(2, 3))  # (B, C)
        return self.linear(x)  # (B, classes) or (B, T, classes)


class MetaFlow(nn.Module):
    r"""The FM-KT flow: a :class:`MetaEncoder` :math:`g_\theta` on an affine path, integrated
    from the student representation (``t = 0``) toward the teacher's (``t = 1``) by
    :meth:`unroll` with explicit Euler steps.

    On the straight path (the authors' rollout) the encoder gives the displacement from the
    start: step :math:`k` predicts :math:`\hat y_k = s + g_\theta(x_k, t_k)` and moves the
    state by :math:`g_\theta(x_k, t_k)/N`, so that :math:`x_1 = \frac1N\sum_k \hat y_k` is
    the mean of the step predictions. On the VP and VE paths (extensions of this project)
    the encoder predicts the endpoint as a residual on the current state,
    :math:`\hat y(x, t) = x + g_\theta(x, t)`, and the path turns it into the velocity
    :math:`v = \dot\alpha_t \hat y + \dot\sigma_t (x - \alpha_t \hat y) / \sigma_t`
    (:meth:`~flowdistill.flows.AffinePath.x1_to_velocity`)."""

    def __init__(
        self,
        shape: Shape,
        path: str = "straight",
        encoder: str = "auto",
        hidden: int | None = None,
        depth: int = 1,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(path, str) or path.lower() not in PATHS:
            raise ConfigError(f"fmkt: path must be one of {sorted(PATHS)}, got {path!r}")
        self.path_name = path.lower()
        self.path: AffinePath = get_path(self.path_name)
        self.encoder = MetaEncoder(shape, encoder, hidden, depth, causal)

    def endpoint(
        self, t: float | torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The VP/VE paths' teacher-side endpoint predicted at ``(x, t)``: ``x + g(x, t)``."""
        return x + self.encoder(x, t, mask)

    def velocity(
        self, t: float | torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The field ``dx/dt`` at ``(x, t)``, in the ``func(t, x)`` order of
        :func:`flowdistill.flows.odeint`: ``g(x, t)`` on the straight path."""
        if self.path_name == "straight":
            return self.encoder(x, t, mask)
        return self.path.x1_to_velocity(self.endpoint(t, x, mask), x, t)

    def unroll(
        self, s: torch.Tensor, steps: int, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(x_1, [ŷ_0, …, ŷ_{N-1}])``: ``steps`` Euler steps from ``x_0 = s`` with the
        endpoint predicted at every step (differentiable in ``s`` and the encoder); ``mask``
        ``(B, T)``: the real tokens of padded sequences (see :class:`MetaEncoder`)."""
        x, preds = s, []
        for k in range(int(steps)):
            t = torch.full((), k / steps, dtype=x.dtype, device=x.device)
            if self.path_name == "straight":  # the authors' rollout: predictions from s
                g = self.encoder(x, t, mask)
                preds.append(s + g)
                x = x + g / steps
                continue
            y = self.endpoint(t, x, mask)
            preds.append(y)
            x = x + self.path.x1_to_velocity(y, x, t) / steps
        return x, preds


# ---------------------------------------------------------------------------- metric
def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1) if x.ndim == 4 else x


def step_metric(
    name: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 2.0,
    dist_beta: float = 2.0,
    dist_gamma: float = 2.0,
    dist_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The metric-based loss of one FM-KT step between a prediction and its target.

    ``"kd"`` (:func:`flowdistill.losses.kd`), ``"dkd"`` (:func:`~flowdistill.losses.dkd`,
    logits with ``labels`` only), ``"pkd"`` (:func:`~flowdistill.losses.pkd`) or ``"dist"``
    (:func:`~flowdistill.losses.dist`, with its own ``dist_temperature``; ``temperature``
    is KD's and DKD's). Defaults are those of the authors' FM-KT code: KD at ``T = 4``,
    DKD with ``alpha = 1, beta = 2, T = 4``, DIST with ``beta = gamma = 2, T = 1``. KD and
    DIST treat the channels of a feature map (the
    last dimension of vectors and tokens) as the classes of each position. ``mask`` (the
    leading shape of token logits or features) leaves padded positions out.
    """
    if name == "pkd":
        return losses.pkd(pred, target, mask=mask)
    if name == "kd":
        return losses.kd(_channels_last(pred), _channels_last(target), temperature, mask)
    if name == "dist":
        return losses.dist(
            _channels_last(pred),
            _channels_last(target),
            beta=dist_beta,
            gamma=dist_gamma,
            temperature=dist_temperature,
            mask=mask,
        )
    if name == "dkd":
        if labels is None or pred.ndim != 2:
            raise ConfigError("fmkt: metric 'dkd' needs logits (B, classes) and class labels")
        return losses.dkd(pred, target, labels, dkd_alpha, dkd_beta, temperature, mask)
    raise ConfigError(f"fmkt: metric must be one of {METRICS}, got {name!r}")


def parse_steps(name: str, steps: Sequence[int] | int | None, default: Sequence[int]):
    """Training step counts as a tuple of positive ints (``None``: ``default``)."""
    if steps is None:
        return tuple(default)
    values = (steps,) if isinstance(steps, int) else tuple(steps)
    if not values or any(isinstance(n, bool) or int(n) != n or int(n) < 1 for n in values):
        raise ConfigError(f"{name}: train_steps must be positive integers, got {steps!r}")
    return tuple(int(n) for n in values)


def draw_steps(choices: tuple[int, ...]) -> int:
    """One step count drawn uniformly from ``choices`` with torch's global generator (so a
    resumed run redraws the same counts)."""
    if len(choices) == 1:
        return choices[0]
    return choices[int(torch.randint(len(choices), ()))]


class _StepStats:
    """Per-epoch means of the drawn step counts and of the ensemble spread (the standard
    deviation of the step predictions across the steps, averaged over elements). The spread
    is summed on the predictions' device and read once, in :meth:`as_dict`: a training step
    never waits for the device."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.reset()

    def reset(self) -> None:
        self.n, self.steps, self.spread = 0, 0.0, 0.0

    @torch.no_grad()
    def add(self, preds: list[torch.Tensor]) -> None:
        self.n += 1
        self.steps += len(preds)
        if len(preds) > 1:
            self.spread = self.spread + torch.stack(preds).float().std(0, correction=0).mean()

    def as_dict(self) -> dict[str, float]:
        if not self.n:
            return {}
        return {
            f"{self.prefix}_steps": self.steps / self.n,
            f"{self.prefix}_spread": float(self.spread) / self.n,
        }


def causal_sequences(name: str, causal: bool | str, logits_shape: Shape) -> bool:
    """Whether a flow on this student's sequences must be causal: ``"auto"`` where the
    student predicts per token (logits ``(T, V)`` per sample, a causal language model), so
    that no position of the flow reads a later token."""
    if causal == "auto":
        return len(logits_shape) == 2
    if not isinstance(causal, bool):
        raise ConfigError(f"{name}: causal must be 'auto', true or false, got {causal!r}")
    return causal


class _Insertion:
    """The flow inserted into the student at its tap: the two hooks that run it, what they
    need (the flow, the step counts, the real tokens of the call) and their removal when it
    goes. The hooks hold it weakly and are copied or pickled with it, as the taps' hooks
    are; it holds the flow, not the distiller, so that a student copied or saved alone takes
    the small flow along (not the teacher), in a copy that nothing holds, which is collected
    and removes the copied hooks."""

    def __init__(self, student: nn.Module, tap: str, flow: MetaFlow, steps: int, name: str):
        module = resolve_module(student, tap)
        if any(isinstance(h, _InsertionHook) and h.owner() is not None
               for h in module._forward_hooks.values()):  # fmt: skip
            raise ConfigError(
                f"{name}: another FM-KT distiller has its flow inserted at {tap!r} of this "
                "student; one student takes one inserted flow (give each its own student, "
                "copy.deepcopy)"
            )
        self.flow, self.tap, self.name, self.inference_steps = flow, tap, name, int(steps)
        self.steps: int | None = None  # of the distiller's current call, else inference_steps
        self.capture = False  # whether to keep the rollout for the distiller's loss
        self.rollout: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.real: torch.Tensor | None = None  # the real tokens the distiller passes
        self.call_mask: torch.Tensor | None = None  # of the student's latest keyword call
        self.handles = [
            module.register_forward_hook(_InsertionHook(self)),
            student.register_forward_pre_hook(_CallMaskHook(self), with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.remove()
        except Exception:
            pass


class _Owned:
    """A hook holding its :class:`_Insertion` weakly (a student outliving it runs no
    flow), copied or pickled together with it."""

    def __init__(self, insertion: _Insertion | None = None) -> None:
        self.owner = weakref.ref(insertion) if insertion is not None else _nobody

    def __reduce__(self) -> tuple:
        return (type(self), (self.owner(),))


def _nobody() -> None:
    return None


class _InsertionHook(_Owned):
    """Forward hook replacing the tapped module's output by the flow's ``x_1``."""

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any):
        ins = self.owner()
        if ins is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise TapError(
                f"{ins.name}: the tapped module {ins.tap!r} returns {type(output).__name__}; "
                "serial insertion needs a module returning a tensor"
            )
        steps = ins.steps if ins.steps is not None else ins.inference_steps
        mask = ins.real if ins.real is not None else ins.call_mask
        x1, preds = ins.flow.unroll(output, steps, per_token(mask, output))
        if ins.capture:
            ins.rollout = (output, preds)
        return x1.to(output.dtype)


class _CallMaskHook(_Owned):
    """Forward pre-hook on the student: the attention mask of the keyword inputs it is
    called with, for the inserted flow (the student called directly, not through the
    distiller, still leaves padding out)."""

    def __call__(self, _module: nn.Module, _args: Any, kwargs: dict) -> None:
        ins = self.owner()
        if ins is not None:
            ins.call_mask = input_segments(kwargs) if kwargs else None


# ---------------------------------------------------------------------------- FM-KT
@register("fmkt")
class FMKT(Distiller):
    """FM-KT: a meta-encoder flow, unrolled over random Euler steps, carries student to teacher.

    Knowledge transfer with flow matching (Shao et al., 2024): a time-conditioned meta-encoder
    integrated in N Euler steps from the student's representation toward the teacher's, a
    metric loss (KD/DKD/PKD/DIST) at every step, VP/VE/straight paths, serial insertion of
    the flow into the student for features and an implicit ensemble over the steps for logits
    (see this module's documentation)."""

    masks_padding = True

    # (the loss weight, not KD's temperature: the default metric on logits is DIST, whose
    # temperature is its own, and PKD on features has none)
    tune_grid = {"inference_steps": [2, 4], "fm_weight": [1.0, 2.0]}

    needs_shapes = True
    taps_hint = "it takes one feature as tap=<student module> (and teacher_tap=)"

    def __init__(
        self,
        teacher,
        student,
        *,
        tap: str = LOGITS,
        teacher_tap: str | None = None,
        head_tap: str | None = None,
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
        ce_weight: float = 1.0,
        causal: bool | str = "auto",
        **base: Any,
    ) -> None:
        name = self.name or "fmkt"
        if not isinstance(tap, str) or not tap:
            raise ConfigError(f"{name}: tap must be a module path or 'logits', got {tap!r}")
        feature_mode = tap != LOGITS
        teacher_tap = tap if teacher_tap is None else teacher_tap
        if head_tap is not None and feature_mode:
            raise ConfigError(
                f"{name}: head_tap is logit mode on a feature (the authors' logit-based "
                f"module); leave tap='logits' (got tap={tap!r})"
            )
        head_tap = take_head_tap(name, head_tap, student, base)
        if feature_mode:
            if teacher_tap == LOGITS:
                raise ConfigError(f"{name}: a feature tap {tap!r} needs a feature teacher_tap")
            if "[" in tap:
                raise ConfigError(
                    f"{name}: serial insertion needs a plain module path, got {tap!r}"
                )
            for key, extra in (("student_taps", tap), ("teacher_taps", teacher_tap)):
                taps = base.get(key, (LOGITS,))
                if not isinstance(taps, str):
                    base[key] = [*taps, extra]
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        self.feature_mode = feature_mode
        if metric not in METRICS:
            raise ConfigError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
        if metric == "auto":
            metric = "pkd" if self.feature_mode else "dist"
        if metric == "dkd" and self.feature_mode:
            raise ConfigError(f"{name}: metric 'dkd' needs class logits; use it with tap='logits'")
        if temperature <= 0 or dist_temperature <= 0:
            raise ConfigError(f"{name}: temperatures must be positive")
        if int(inference_steps) < 1 or int(dkd_warmup) < 0:
            raise ConfigError(f"{name}: need inference_steps >= 1 and dkd_warmup >= 0")
        self.tap, self.teacher_tap, self.metric = tap, teacher_tap, metric
        default = FEATURE_STEPS if self.feature_mode else LOGIT_STEPS
        self.train_steps = parse_steps(name, train_steps, default)
        self.inference_steps = int(inference_steps)
        self.fm_weight, self.temperature = float(fm_weight), float(temperature)
        self.metric_options = {
            "temperature": self.temperature,
            "dkd_alpha": float(dkd_alpha),
            "dkd_beta": float(dkd_beta),
            "dist_beta": float(dist_beta),
            "dist_gamma": float(dist_gamma),
            "dist_temperature": float(dist_temperature),
        }
        self.dkd_warmup = int(dkd_warmup)
        self.warmup_factor = 1.0  # DKD's linear warm-up, set per epoch by on_epoch_start

        self.head_tap = head_tap
        shape = self.student_shapes[head_tap or tap]
        self.causal = causal_sequences(name, causal, self.student_shapes[LOGITS])
        self.flow = MetaFlow(shape, path, encoder, hidden, depth, self.causal)
        self.head = logit_head(name, head_tap, self.student_shapes)
        self._head_reach = reaching(self, head_tap, base.get("example_input"))
        self.target_proj: nn.Module | None = None
        self._insertion: _Insertion | None = None
        self._stats = _StepStats(name)
        if self.feature_mode:
            t_shape = self.teacher_shapes[teacher_tap]
            # BatchNorm in front of the teacher projection, as the authors' (over the counted
            # positions of a padded sequence)
            self.target_norm = ChannelNorm(t_shape)
            self.target_proj = make_adapter(t_shape, shape)
            # (its hooks go when the distiller goes: a student used again keeps none)
            self._insertion = _Insertion(self.student, tap, self.flow, inference_steps, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "inference_steps":
            try:
                valid = not isinstance(value, bool) and int(value) == value >= 1
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise ConfigError(
                    f"{self.name or 'fmkt'}: inference_steps must be an integer >= 1, got {value!r}"
                )
            value = int(value)
        super().__setattr__(name, value)
        if name == "inference_steps" and self.__dict__.get("_insertion") is not None:
            self._insertion.inference_steps = value  # (the student called directly)

    # ------------------------------------------------------------------ schedule, reports
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self._stats.reset()
        if self.metric == "dkd" and self.dkd_warmup > 0:
            self.warmup_factor = min(1.0, (epoch + 1) / self.dkd_warmup)

    def diagnostics(self) -> dict[str, float]:
        """Mean training step count and mean spread of the step predictions this epoch."""
        return self._stats.as_dict()

    def deployed_modules(self) -> list[nn.Module]:
        """The student and the meta-flow (inserted in feature mode, the ensemble in logit
        mode) with the learned head of ``head_tap``; the teacher projection is used in
        training only."""
        return [self.student, self.flow] + ([self.head] if self.head is not None else [])

    def num_deployed_params(self) -> int:
        return deployed_count(self)

    # ------------------------------------------------------------------ pieces
    def _metric(self, pred, target, labels, mask=None) -> torch.Tensor:
        return step_metric(self.metric, pred, target, labels, mask=mask, **self.metric_options)

    def _student_with_flow(self, inputs: Any, steps: int, targets: torch.Tensor | None = None):
        """``(student features with the flow inserted at tap, the tapped feature before
        the flow, the step predictions)``; padded tokens (the inputs' attention mask, else
        the targets' padding) left out of the flow's attention."""
        ins = self._insertion
        ins.steps, ins.capture, ins.rollout = steps, True, None
        ins.real = self.real_tokens(inputs, targets)
        try:
            s_out = self.student_forward(inputs)
            rollout = ins.rollout
        finally:
            ins.steps, ins.capture, ins.rollout, ins.real = None, False, None, None
        if rollout is None:
            raise TapError(f"{self.name}: the forward pass did not reach the tap {self.tap!r}")
        start, preds = rollout
        return s_out, start, preds

    # ------------------------------------------------------------------ training
    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_out = self.teacher_forward(inputs)
        steps = draw_steps(self.train_steps) if self.training else self.inference_steps
        if self.feature_mode:
            s_out, start, preds = self._student_with_flow(inputs, steps, targets)
            t_feat = t_out[self.teacher_tap].to(preds[0].dtype)
            mask = self.feature_mask(targets, preds[0], f"tap {self.tap!r}", inputs)
            self.feature_mask(targets, t_feat, f"teacher_tap {self.teacher_tap!r}", inputs)
            target = self.target_proj(self.target_norm(t_feat, mask))
            start = start.to(preds[0].dtype)
            need = start - target  # the displacement the student needs; each step's own:
            fm = torch.stack([self._metric(need, start - p, None, mask) for p in preds]).mean()
            ce = self.cross_entropy(s_out[LOGITS], targets)
        else:
            preds = self.step_logits(self.student_forward(inputs), inputs, steps, targets)
            t_logits, mask = t_out[LOGITS], self.token_mask(targets)
            fm = torch.stack([self._metric(p, t_logits, targets, mask) for p in preds]).mean()
            ce = torch.stack([self.cross_entropy(p, targets) for p in preds]).mean()
        if self.training:
            self._stats.add(preds)
        return self.total(
            {
                "ce": self.ce_weight * ce,
                "fmkt": self.fm_weight * self.warmup_factor * fm,
            }
        )

    @torch.no_grad()
    def predict(self, inputs: Any) -> torch.Tensor:
        """Feature mode: the student with the flow inserted (``inference_steps`` Euler steps).
        Logit mode: the mean of the step predictions (the implicit ensemble)."""
        if self.feature_mode:
            return self._student_with_flow(inputs, self.inference_steps)[0][LOGITS]
        s_out = self.student_taps(inputs)[1]
        return torch.stack(self.step_logits(s_out, inputs, self.inference_steps)).mean(0)

    def step_logits(
        self, s_out: dict, inputs: Any, steps: int, targets: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Logit mode: each Euler step's predicted logits, from the student's logits or,
        with ``head_tap``, from its feature there through the learned head; padded tokens
        (the inputs' attention mask, else the targets' padding) left out."""
        return step_logits(self, s_out, inputs, steps, targets)


def step_logits(
    owner: Distiller, s_out: dict, inputs: Any, steps: int, targets: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Each of ``steps`` Euler steps' predicted logits of ``owner``'s flow (FM-KT's or
    OFM-KT's): from the student's logits in ``s_out``, or from its feature at ``head_tap``
    through the learned head; padded tokens left out of the flow's attention."""
    source = s_out[owner.head_tap] if owner.head is not None else s_out[LOGITS]
    real = per_token(owner.real_tokens(inputs, targets), source)
    _, preds = owner.flow.unroll(source, steps, real)
    return preds if owner.head is None else [owner.head(p) for p in preds]


def take_head_tap(name: str, head_tap: str | None, student: nn.Module, base: dict) -> str | None:
    """``head_tap`` checked (``"auto"``: the module whose output the student declares its
    classifier reads, ``classifier_input()``, else its deepest declared feature stage) and
    added to the student taps of the base options ``base``; the module path is returned."""
    if head_tap is None:
        return None
    if not isinstance(head_tap, str) or not head_tap or head_tap == LOGITS:
        raise ConfigError(
            f"{name}: head_tap is the student module path whose feature the flow runs on "
            f"before a learned head gives logits, got {head_tap!r}"
        )
    if head_tap == "auto":
        declared = getattr(student, "classifier_input", None)
        try:
            head_tap = declared() if callable(declared) else feature_stages(student)[-1]["name"]
        except (ConfigError, IndexError):
            raise ConfigError(
                f"{name}: head_tap='auto' takes the module the student declares its classifier "
                f"reads (classifier_input(), else its deepest feature_info stage), and "
                f"{type(student).__name__} declares neither: name the module whose output its "
                "classifier reads, head_tap=<module path>"
            ) from None
    taps = base.get("student_taps", (LOGITS,))
    if not isinstance(taps, str):
        base["student_taps"] = [*taps, head_tap]
    return head_tap


def logit_head(name: str, head_tap: str | None, shapes: dict) -> LogitHead | None:
    """The learned head on the student's feature at ``head_tap`` (``None`` without one),
    checked to give logits of the student's shape (``shapes``: its probed tap shapes)."""
    if head_tap is None:
        return None
    shape, logits = shapes[head_tap], tuple(shapes[LOGITS])
    head = LogitHead(shape, logits[-1])
    got = tuple(head(torch.zeros(1, *shape)).shape[1:])
    if got != logits:
        raise ShapeMismatchError(
            f"{name}: a head on head_tap {head_tap!r} (per-sample shape {shape}) gives "
            f"logits of shape {got}, the student's are {logits}: tap the feature its "
            "classifier reads (a map or vector for one prediction per sample, a token "
            "sequence for one per token)"
        )
    return head


def reaching(distiller: Distiller, tap: str | None, example: Any) -> list[str]:
    """Names of the student parameters that the feature at ``tap`` depends on (a gradient
    reaches them from it on ``example``): with ``head_tap`` the predictor runs the student
    up to there, and its classifier not at all. Empty without a tap."""
    if tap is None or example is None:
        return []
    student = distiller.student
    named = [(n, p) for n, p in student.named_parameters() if p.is_floating_point()]
    flags = [p.requires_grad for _, p in named]  # (frozen layers run at deployment too)
    was_training = student.training
    student.eval()
    try:
        for _, p in named:
            p.requires_grad_(True)
        with torch.enable_grad():
            feature = distiller.student_taps(example)[1][tap]
            if not named or feature.grad_fn is None:  # nothing to trace: all of it counts
                return [n for n, _ in student.named_parameters()]
            grads = torch.autograd.grad(
                feature.float().sum(), [p for _, p in named], allow_unused=True
            )
    finally:
        for (_, p), flag in zip(named, flags, strict=True):
            p.requires_grad_(flag)
        student.train(was_training)
    return [n for (n, _), g in zip(named, grads, strict=True) if g is not None]


def deployed_count(distiller: Distiller) -> int:
    """Parameters of the deployed predictor; with a learned head on ``head_tap`` in it, the
    student counts only the parameters its feature there depends on."""
    modules = distiller.deployed_modules()
    head = getattr(distiller, "head", None)
    if head is None or not any(m is head for m in modules):
        return Distiller.num_deployed_params(distiller)
    params = dict(distiller.student.named_parameters())
    seen = {id(params[n]): params[n] for n in distiller._head_reach}
    for module in modules:
        if module is not distiller.student:
            seen.update({id(p): p for p in module.parameters()})
    return sum(p.numel() for p in seen.values())


register_variant(
    "fmkt-head", "fmkt", "the authors' logit-based module: the flow on the feature the "
    "student's classifier reads, a learned pooling + linear head per step", head_tap="auto",
)  # fmt: skip

r"""FlowDistill: flow-based knowledge transfer (after Yang et al., "Flow-Based Knowledge
Transfer for Efficient Large Model Distillation", AAAI 2026).

No public code of the paper exists; this is the project's design of its three parts, each a
switch so that benchmarks can ablate it.

**Invertible knowledge mapping.** For every distilled pair (a student tap and a teacher tap,
plus the logits) an adapter maps the student feature into the teacher's space,
:math:`a = A(s)`, and a continuous flow :math:`\Phi` (a :class:`~flowdistill.flows.FlowMap`
over a conditional velocity network) transports :math:`a` toward the teacher feature
:math:`t` (standardised per channel). The flow is trained simulation-free by conditional
flow matching on the straight path between the paired endpoints,

.. math::

    x_u = (1 - u)\,\bar a + u\,t + \sigma\varepsilon, \qquad
    \mathcal{L}_\mathrm{fm} = \lVert v_\theta(x_u, u, c) - (t - \bar a) \rVert^2,
    \qquad u \sim \mathcal{U}(0, 1),

with :math:`\bar a` the detached adapter output. The student is trained *through* the flow:
a K-step transport :math:`\hat s = \Phi_K(a)` is matched to the target (MSE on standardised
features, KL or DIST on logits). By default the flow's own parameters learn only from
:math:`\mathcal{L}_\mathrm{fm}` (``flow_grad="fm"``): the flow is an estimate of where the
teacher's feature lies given the student's, and the student is pushed to make that estimate
accurate. With ``anchor_weight`` > 0 the adapter output itself is also matched to the same
target on each feature pair (:math:`w\,\lVert a - t\rVert^2`): the flow then refines a
student representation that is held on the teacher's, rather than standing in for it. As
:math:`\Phi` is a bijection the transfer can be diagnosed every epoch on a held
batch: the transport error :math:`\lVert\Phi(a) - t\rVert / \lVert t\rVert`, the inverse
round-trip error :math:`\lVert\Phi^{-1}(\Phi(a)) - a\rVert / \lVert a\rVert` of the flow
itself (accurate RK4 solve: how invertible the learned field is) and of the ``steps``-step
transport the student is trained through, run backwards with its own solver
(``transport_roundtrip_error``: what that discretisation loses), and the negative
log-likelihood per dimension of teacher features under
:math:`\Phi_\#\mathcal{N}(\mu_a, \sigma_a^2)` (Hutchinson trace).

**Flow-guided progressive distillation.** Over the first ``ramp`` fraction of training:
the target moves along the path from the student's own representation to the teacher's
(transport to time :math:`\tau` and match :math:`x_\tau = (1-\tau)\bar a + \tau t`, with
:math:`\tau` ramping to 1); the number of transport steps ramps from 1 to ``steps``; and the
pairs switch on from shallow taps to deep taps and then the logits.

The velocity field of a feature map or token sequence acts on each position alone by default
(``field="lean"``: one FiLM-modulated hidden layer per position, the cheapest field;
``field="pointwise"``: a residual MLP per position); ``field="spatial"`` mixes neighbouring
positions with 3×3 convolutions (attention over tokens) at several times the cost. Per-position
fields see a map ``(B, C, H, W)`` as rows of positions ``(B, H*W, C)``. Vectors (logits,
pooled features) use a residual MLP field.

**Conditional flow network.** The velocity field is conditioned through FiLM on a context
computed from the student side only (pooled student features and softened student logits,
detached), plus an optional learned task embedding. Where the student predicts per token
(logits ``(B, T, V)``, a causal language model) the context is causal by default: position
:math:`i` sees the mean over positions :math:`\le i` only, so the flow never reads the
tokens it is asked to predict (``context="pooled"`` pools over the whole sequence instead:
over each document's real tokens where a batch carries padding or packs several documents
per row).

At inference the student runs alone (``inference="student"``); with
``inference="flow"`` the prediction is the flow-transported student logits.

A flow trained by flow matching carries the *distribution* of adapter outputs onto that of
teacher features; it keeps the pairing of a sample with its own teacher output only where the
student's representation predicts the teacher's well. Where it does not, the transported
representation is a plausible teacher output rather than the paired one. On the per-token
logits of a small character language model, matching transported logits made the student
worse than training it alone; the language-model suites therefore set ``logit_weight=0``
(the logit flow is still fitted, for diagnostics and ``inference="flow"``), chosen on their
selection split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import losses
from ..adapters import ChannelNorm, feature_kind, make_adapter
from ..data.inputs import input_segments, take
from ..errors import ConfigError
from ..flows import (
    ConditionEmbedding,
    ConvVelocity,
    FiLM,
    FlowMap,
    MLPVelocity,
    TokenVelocity,
    odeint,
)
from ..taps import LOGITS
from .base import Distiller, per_token
from .registry import register, register_variant

__all__ = ["FlowDistill"]

_SOLVERS = ("euler", "midpoint", "heun", "rk4")
_PER_POSITION = ("pointwise", "lean")  # fields that act on each position alone
_FIELDS = ("spatial", *_PER_POSITION)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 or wider (bf16/fp16 under autocast are widened, float64 is kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample vector of a feature: mean over positions (maps) or tokens (the real
    tokens, ``mask > 0`` of a ``(B, T)`` mask, when it fits)."""
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        if per_token(mask, x) is None:
            return x.mean(dim=1)
        weight = (mask > 0).to(x.dtype)[..., None]  # (B, T, 1)
        return (x * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    return x.flatten(1)


def _causal_mean(x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Running mean over tokens ``(B, T, D)``: position ``i`` holds the mean of ``x[:, :i+1]``;
    with ``segments`` ``(B, T)`` (documents, 0 at padding: :meth:`Distiller.real_tokens`)
    the mean of the real tokens of its own document up to ``i`` (0 before the first)."""
    if segments is None:
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        return x.cumsum(dim=1) / counts[:, None]
    seg = segments.long()
    weight = (seg > 0).to(x.dtype)[..., None]  # (B, T, 1)
    sums, counts = (x * weight).cumsum(dim=1), weight.cumsum(dim=1)
    # the running sums restart where a document starts: subtract those before its start
    index = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    before = (first - 1).clamp(min=0)[..., None]
    had = (first > 0)[..., None].to(x.dtype)
    sums = sums - had * sums.gather(1, before.expand_as(sums))
    counts = counts - had * counts.gather(1, before)
    return sums / counts.clamp_min(1.0)


def _document_mean(x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-token mean over documents ``(B, T, D)``: at each real token the mean of ``x`` over
    the real tokens of its own document (earlier and later ones), 0 at padding; ``segments``
    ``(B, T)`` as :func:`_causal_mean` takes them (document ids run up to ``T + 1``)."""
    seg = segments.long()
    weight = (seg > 0).to(x.dtype)[..., None]  # (B, T, 1)
    index = seg[..., None].expand_as(x)
    size = (x.shape[0], seg.shape[1] + 2)
    sums = x.new_zeros(*size, x.shape[-1]).scatter_add(1, index, x * weight)
    counts = weight.new_zeros(*size, 1).scatter_add(1, seg[..., None], weight)
    return sums.gather(1, index) / counts.gather(1, seg[..., None]).clamp_min(1.0) * weight


def _rel(u: torch.Tensor, w: torch.Tensor) -> float:
    """Mean per-sample error norm relative to the mean per-sample norm of ``w``."""
    err = (u - w).flatten(1).norm(dim=1).mean()
    return float(err / w.flatten(1).norm(dim=1).mean().clamp_min(1e-12))


class _Standardize(ChannelNorm):
    """Per-channel standardisation of teacher features (batch statistics in training,
    running statistics in evaluation), without learnable parameters. For token sequences
    with a padding ``mask`` ``(B, T)``, the batch statistics (and the running ones they
    update) are taken over the counted positions only."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape, affine=False, momentum=0.1)


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """A map ``(B, C, H, W)`` as contiguous rows of positions ``(B, H*W, C)``."""
    return x.flatten(2).transpose(1, 2).contiguous()


def _from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_to_rows` for a map of ``shape``."""
    return rows.transpose(1, 2).reshape(shape)


class _Pointwise(nn.Module):
    """A vector velocity field applied at every position of a map ``(B, C, H, W)`` or every
    token of ``(B, N, D)``: channel mixing only, far cheaper than 3×3 convolutions."""

    def __init__(self, channels: int, hidden: int, depth: int, cond_dim: int | None) -> None:
        super().__init__()
        self.field = MLPVelocity(channels, hidden=hidden, depth=depth, cond_dim=cond_dim)

    @property
    def embed(self) -> nn.Module:
        return self.field.embed

    @property
    def out(self) -> nn.Module:
        return self.field.out

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 4:
            return _from_rows(self(_to_rows(x), t, context), x.shape)
        f = self.field
        # one time/context embedding per sample, broadcast over its positions by FiLM
        emb = f.embed(t, x, context)  # (B, hidden)
        h = f.inp(x)  # (B, N, hidden)
        for block in f.blocks:
            h = block(h, emb)
        return f.out(F.silu(f.out_norm(h)))  # (B, N, D)


class _Lean(nn.Module):
    r"""The cheapest per-position velocity field: one FiLM-modulated hidden layer,
    :math:`v(x, t, c) = W_2\,\mathrm{SiLU}(\mathrm{FiLM}_e(W_1 x))` at every position of a
    map ``(B, C, H, W)`` or every token of ``(B, N, D)``, with :math:`e` the embedding of
    time and context; :math:`W_2` is zero-initialised, so a new field is the identity flow."""

    def __init__(self, channels: int, hidden: int, cond_dim: int | None) -> None:
        super().__init__()
        self.embed = ConditionEmbedding(hidden, cond_dim)
        self.inp = nn.Linear(channels, hidden)
        self.film = FiLM(hidden, hidden)
        self.out = nn.Linear(hidden, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 4:
            return _from_rows(self(_to_rows(x), t, context), x.shape)
        emb = self.embed(t, x, context)  # (B, hidden)
        return self.out(F.silu(self.film(self.inp(x), emb)))  # (B, N, D)


def _velocity(
    shape: tuple[int, ...], hidden: int, depth: int, cond_dim: int | None, field: str,
    causal: bool = False,
) -> nn.Module:  # fmt: skip
    kind = feature_kind(shape)
    channels = shape[0] if kind == "map" else shape[-1]
    if kind != "vector" and field == "pointwise":
        return _Pointwise(channels, hidden, depth, cond_dim)
    if kind != "vector" and field == "lean":
        return _Lean(channels, hidden, cond_dim)
    if kind == "vector":
        return MLPVelocity(shape[0], hidden=hidden, depth=depth, cond_dim=cond_dim)
    if kind == "map":
        return ConvVelocity(shape[0], hidden=hidden, depth=depth, cond_dim=cond_dim)
    heads = 4 if hidden % 4 == 0 else 1
    return TokenVelocity(
        shape[1], hidden=hidden, depth=depth, heads=heads, cond_dim=cond_dim, causal=causal
    )


@register("flowdistill")
class FlowDistill(Distiller):
    """FlowDistill: a conditional flow, trained by flow matching, carries student to teacher.

    Invertible knowledge mapping, flow-guided progressive transfer and a conditional velocity
    field, as described in this module's documentation; every part is an option."""

    masks_padding = True

    tune_grid = {"temperature": [1.0, 4.0], "logit_weight": [0.0, 1.0]}

    needs_shapes = True
    uses_feature_taps = True

    def __init__(
        self,
        teacher,
        student,
        *,
        distill_logits: bool = True,
        steps: int = 2,
        solver: str = "euler",
        hidden: int = 32,
        depth: int = 1,
        field: str = "lean",
        sigma: float = 0.0,
        fm_weight: float = 1.0,
        feature_weight: float = 1.0,
        anchor_weight: float = 0.0,
        logit_weight: float = 1.0,
        kd_weight: float = 1.0,
        temperature: float = 4.0,
        logit_loss: str = "kl",
        standardize: bool = True,
        flow: bool = True,
        flow_grad: str = "fm",
        conditional: bool = True,
        num_tasks: int = 0,
        task: int = 0,
        progressive_target: bool = True,
        progressive_steps: bool = True,
        progressive_stages: bool = True,
        ramp: float = 0.5,
        inference: str = "student",
        context: str = "auto",
        diagnostics_batch: int = 64,
        ce_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if int(steps) < 1:
            raise ConfigError(f"flowdistill: steps must be >= 1, got {steps}")
        if solver not in _SOLVERS:
            raise ConfigError(f"flowdistill: solver must be one of {_SOLVERS}, got {solver!r}")
        if field not in _FIELDS:
            raise ConfigError(f"flowdistill: field must be one of {_FIELDS}, got {field!r}")
        if logit_loss not in ("kl", "dist"):
            raise ConfigError(f"flowdistill: logit_loss must be 'kl' or 'dist', got {logit_loss!r}")
        if flow_grad not in ("fm", "all"):
            raise ConfigError(f"flowdistill: flow_grad must be 'fm' or 'all', got {flow_grad!r}")
        if inference not in ("student", "flow"):
            raise ConfigError(
                f"flowdistill: inference must be 'student' or 'flow', got {inference!r}"
            )
        if inference == "flow" and not (flow and distill_logits):
            raise ConfigError("flowdistill: inference='flow' needs flow=True and distill_logits")
        if context not in ("auto", "pooled", "causal"):
            raise ConfigError(
                f"flowdistill: context must be 'auto', 'pooled' or 'causal', got {context!r}"
            )
        if not 0.0 <= ramp <= 1.0:
            raise ConfigError(f"flowdistill: ramp must be in [0, 1], got {ramp}")
        if temperature <= 0:
            raise ConfigError(f"flowdistill: temperature must be positive, got {temperature}")
        if sigma < 0:
            raise ConfigError(f"flowdistill: sigma must be >= 0, got {sigma}")
        if anchor_weight < 0:
            raise ConfigError(f"flowdistill: anchor_weight must be >= 0, got {anchor_weight}")
        if num_tasks < 0 or (num_tasks and not 0 <= task < num_tasks):
            raise ConfigError(f"flowdistill: task {task} is not in [0, num_tasks={num_tasks})")

        s_feats = [n for n in self.student_tap_names if n != LOGITS]
        t_feats = [n for n in self.teacher_tap_names if n != LOGITS]
        if len(s_feats) != len(t_feats):
            raise ConfigError(
                f"flowdistill pairs student and teacher taps in order: got {len(s_feats)} "
                f"student taps {s_feats} and {len(t_feats)} teacher taps {t_feats}"
            )
        self.pairs: list[tuple[str, str]] = list(zip(s_feats, t_feats, strict=True))
        if distill_logits:
            self.pairs.append((LOGITS, LOGITS))
        if not self.pairs:
            raise ConfigError("flowdistill needs feature taps or distill_logits=True")

        self.steps, self.solver, self.sigma = int(steps), solver, float(sigma)
        self.fm_weight, self.feature_weight = float(fm_weight), float(feature_weight)
        self.anchor_weight = float(anchor_weight)
        self.logit_weight, self.kd_weight = float(logit_weight), float(kd_weight)
        self.temperature, self.logit_loss = float(temperature), logit_loss
        self.use_flow, self.flow_grad, self.inference = flow, flow_grad, inference
        self.progressive_target = progressive_target
        self.progressive_steps = progressive_steps
        self.progressive_stages = progressive_stages
        self.ramp, self.diagnostics_batch = float(ramp), int(diagnostics_batch)
        self.task = int(task)
        self.rows = field in _PER_POSITION

        # context: pooled student features and softened student logits (+ task embedding)
        self.conditional = conditional
        token_logits = len(self.student_shapes[LOGITS]) == 2  # logits (B, T, V)
        if context == "causal" and not token_logits:
            raise ConfigError(
                "flowdistill: context='causal' needs per-token logits (B, T, V); got logits "
                f"of shape (B, {', '.join(map(str, self.student_shapes[LOGITS]))})"
            )
        self.causal = token_logits and context != "pooled"
        self.token_logits = token_logits
        cond_dim = None
        if conditional:
            cond_dim = sum(_pool(torch.zeros(1, *self.student_shapes[n])).shape[1] for n in s_feats)
            cond_dim += self.student_shapes[LOGITS][-1]
            self.task_embedding = nn.Embedding(num_tasks, 16) if num_tasks else None
            cond_dim += 16 if num_tasks else 0

        self.adapters = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        self.velocities = nn.ModuleDict()
        for i, (s_name, t_name) in enumerate(self.pairs):
            key = f"p{i}"
            s_shape, t_shape = self.student_shapes[s_name], self.teacher_shapes[t_name]
            if s_name == LOGITS:
                self.adapters[key] = nn.Identity()
            else:
                self.adapters[key] = make_adapter(s_shape, t_shape, init="orthogonal")
                if standardize:
                    self.norms[key] = _Standardize(t_shape)
            if flow:
                self.velocities[key] = _velocity(
                    t_shape, hidden, depth, cond_dim, field, self.causal
                )
        # schedule state, set by on_epoch_start (full transfer until then)
        self.tau, self.active_steps, self.active_pairs = 1.0, self.steps, len(self.pairs)
        self._held: Any = None  # a batch of inputs kept for the diagnostics

    def follow_student_dtype(self) -> FlowDistill:
        """The adapters take the student's floating dtype (they read its features); the
        flows, the standardisation and the task embedding work on the widened adapter
        outputs and teacher features, so they take float32 for a bf16/fp16 student (as
        under autocast) and float64 for a float64 one."""
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), None)
        if dtype is None:
            return self
        wide = torch.promote_types(dtype, torch.float32)
        for module in self.children():
            if module is not self.student and module is not self.teacher:
                module.to(dtype if module is self.adapters else wide)
        return self

    # ------------------------------------------------------------------ schedules
    def epoch_schedule(self, epoch: int, epochs: int) -> dict[str, float]:
        """Progressive transfer over the first ``ramp`` of the run: the pairs in use, and
        with the flow the target's position ``tau`` on the way to the teacher and the
        integration steps."""
        ramp_epochs = self.ramp * epochs
        frac = 1.0 if ramp_epochs <= 0 else min(1.0, (epoch + 1) / ramp_epochs)
        n = len(self.pairs)
        plan = {"active_pairs": max(1, math.ceil(frac * n)) if self.progressive_stages else n}
        if self.use_flow:  # (without the flow, tau and the steps change nothing)
            plan["tau"] = frac if self.progressive_target else 1.0
            plan["active_steps"] = (
                max(1, math.ceil(frac * self.steps)) if self.progressive_steps else self.steps
            )
        return plan

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        plan = self.epoch_schedule(epoch, epochs)
        self.tau = plan.get("tau", 1.0)
        self.active_steps = int(plan.get("active_steps", self.steps))
        self.active_pairs = int(plan["active_pairs"])
        self._held = None

    # ------------------------------------------------------------------ pieces
    def _context(
        self, s_out: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
        documents: bool = False,
    ):  # fmt: skip
        """``(B, cond_dim)``: the student's features and softened probabilities pooled over
        the tokens ``mask`` ``(B, T)`` counts (padding left out). Per token, the pair
        ``(per-token (B, T, cond_dim), per-row (B, cond_dim))``: under a causal context
        (position *i* pools positions <= *i*), or a pooled one over a batch whose ``mask``
        holds the inputs' ``documents`` (each token its own document's means, so that the
        documents packed into one row stay apart); the per-row one serves the pairs whose
        features are not tokens."""
        if not self.conditional:
            return None
        probs = F.softmax(_wide(s_out[LOGITS]) / self.temperature, dim=-1)
        feats = [_wide(s_out[s]) for s, _ in self.pairs if s != LOGITS]
        # class probabilities; for token logits (B, T, V), their mean over the tokens
        rows = [_pool(f, mask) for f in feats] + [_pool(probs, mask)]
        if self.causal:  # position i pools positions <= i
            mean = _causal_mean
        elif documents and self.token_logits and per_token(mask, probs) is not None:
            mean = _document_mean
        else:
            return self._with_task(torch.cat(rows, dim=-1).detach())
        steps = probs.shape[1]
        tokens = [
            mean(f, per_token(mask, f))
            if f.ndim == 3 and f.shape[1] == steps
            else row[:, None].expand(-1, steps, -1)  # fmt: skip
            for f, row in zip([*feats, probs], rows, strict=True)
        ]
        return (
            self._with_task(torch.cat(tokens, dim=-1).detach()),
            self._with_task(torch.cat(rows, dim=-1).detach()),
        )

    def _with_task(self, ctx: torch.Tensor) -> torch.Tensor:
        """``ctx`` with the task embedding appended (when the method has one)."""
        if self.task_embedding is None:
            return ctx
        task = torch.full(ctx.shape[:-1], self.task, device=ctx.device, dtype=torch.long)
        return torch.cat([ctx, self.task_embedding(task)], dim=-1)

    @staticmethod
    def _context_for(x: torch.Tensor, context) -> torch.Tensor | None:
        """The context of a pair whose field acts on ``x``: a per-token context serves token
        sequences of its length, the per-row one any other pair."""
        if not isinstance(context, tuple):
            return context
        tokens, row = context
        return tokens if x.ndim == 3 and x.shape[1] == tokens.shape[1] else row

    def _extras(self, key: str, x: torch.Tensor, context, real: torch.Tensor | None) -> dict:
        """The keyword arguments of pair ``key``'s field on ``x``: its context, and for a
        field that mixes tokens the real tokens ``real`` ``(B, T)`` of a padded batch."""
        extras = {"context": self._context_for(x, context)}
        mixes = getattr(self.velocities[key], "takes_mask", False)
        if mixes and per_token(real, x) is not None:
            extras["mask"] = real
        return extras

    def _field(self, key: str, detach_params: bool, extras: dict):
        net = self.velocities[key]
        if detach_params:
            params = {k: p.detach() for k, p in net.named_parameters()}

            def call(x, t):
                return functional_call(net, params, (x, t), extras)
        else:

            def call(x, t):
                return net(x, t, **extras)

        return call

    def _transport(
        self, key: str, a: torch.Tensor, tau: float, steps: int, context, detach,
        backward: bool = False, real: torch.Tensor | None = None,
    ):  # fmt: skip
        """``Phi`` from time 0 to ``tau`` in ``steps`` fixed steps (differentiable in ``a``);
        ``backward``: from ``tau`` back to 0, the same solver and steps (its inverse, up to
        the discretisation); ``real``: the real tokens of a padded batch."""
        call = self._field(key, detach, self._extras(key, a, context, real))
        times = torch.linspace(0.0, tau, steps + 1, device=a.device, dtype=a.dtype)
        if backward:
            times = times.flip(0)

        def func(t, x):
            return call(x, t.expand(x.shape[0]))

        return odeint(func, a, times, method=self.solver, check_times=False)[-1]

    def _endpoints(self, s_out, t_out, mask: torch.Tensor | None = None):
        """Adapter outputs ``a`` and (standardised) teacher targets ``t`` per pair (the
        statistics of token features over the positions ``mask`` counts)."""
        out = []
        for i, (s_name, t_name) in enumerate(self.pairs):
            key = f"p{i}"
            a = _wide(self.adapters[key](s_out[s_name]))
            t = _wide(t_out[t_name])
            if key in self.norms:
                t = self.norms[key](t, per_token(mask, t))
            if self.rows and a.ndim == 4:  # per-position fields: maps as rows of positions
                a, t = _to_rows(a), _to_rows(t)
            out.append((key, s_name, a, t))
        return out

    @torch.no_grad()
    def endpoints(self, inputs: Any) -> tuple[torch.Tensor | None, list]:
        """The flow's context and, per distilled pair, ``(key, student tap, a, t)``: the
        adapter output and the (standardised) teacher target for ``inputs``, without
        gradients, in the module's current mode (for diagnostics and probes)."""
        t_out, s_out = self.teacher_forward(inputs), self.student_forward(inputs)
        segs = input_segments(inputs)
        real = segs > 0 if segs is not None else None
        return self._context(s_out, segs, documents=True), self._endpoints(s_out, t_out, real)

    @staticmethod
    def _mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
        """Mean squared error; on token sequences ``(B, T, D)`` with a padding ``mask``
        ``(B, T)``, the mean over the counted positions only."""
        return losses.hint(pred, target, per_token(mask, pred))

    def _kl(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
        """Hinton's KD at the flow's temperature; padding left out of per-token logits."""
        return losses.kd(pred, target, self.temperature, per_token(mask, pred))

    def _match(self, is_logits: bool, pred: torch.Tensor, target: torch.Tensor, mask=None):
        if not is_logits:
            return self._mse(pred, target, mask)
        if self.logit_loss == "dist":
            return losses.dist(pred, target, mask=per_token(mask, pred))
        return self._kl(pred, target, mask)

    # ------------------------------------------------------------------ training
    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training and self._held is None:
            self._held = take(inputs, slice(0, self.diagnostics_batch))
        t_out = self.teacher_forward(inputs)
        s_out = self.student_forward(inputs)
        real = self.real_tokens(inputs, targets)  # documents (0: padding), else None
        # the positions the terms count: counted token targets; under class labels, the
        # real tokens of per-token features (the terms apply a mask where it fits)
        mask = self.token_mask(targets)
        mask = (real > 0 if real is not None else None) if mask is None else mask
        context = self._context(s_out, real, documents=input_segments(inputs) is not None)
        terms = {"ce": self.ce_weight * self.cross_entropy(s_out[LOGITS], targets)}
        if self.kd_weight:
            kd = self._kl(s_out[LOGITS], t_out[LOGITS], mask)
            terms["kd"] = self.kd_weight * kd
        fm_terms, feat_terms, logit_terms, anchor_terms = [], [], [], []
        for i, (key, s_name, a, t) in enumerate(self._endpoints(s_out, t_out, mask)):
            is_logits = s_name == LOGITS
            if self.use_flow:
                fm_terms.append(self._flow_matching(key, a.detach(), t, context, mask, real))
            if i >= self.active_pairs:
                continue
            target = t
            if self.use_flow and self.tau < 1.0:  # the target slides from a toward t
                target = (1 - self.tau) * a.detach() + self.tau * t
            if self.use_flow and self.anchor_weight and not is_logits:  # the adapter output
                anchor_terms.append(self._mse(a, target, mask))
            if not (self.logit_weight if is_logits else self.feature_weight):
                continue  # (a zero-weight term is not computed)
            pred = a
            if self.use_flow:
                detach = self.flow_grad == "fm"
                pred = self._transport(
                    key, a, self.tau, self.active_steps, context, detach, real=real
                )
            matched = self._match(is_logits, pred, target, mask)
            (logit_terms if is_logits else feat_terms).append(matched)
        if fm_terms:
            terms["fm"] = self.fm_weight * torch.stack(fm_terms).sum()
        if feat_terms:
            terms["feature"] = self.feature_weight * torch.stack(feat_terms).sum()
        if logit_terms:
            terms["logit"] = self.logit_weight * torch.stack(logit_terms).sum()
        if anchor_terms:
            terms["anchor"] = self.anchor_weight * torch.stack(anchor_terms).sum()
        return self.total(terms)

    def _flow_matching(
        self, key: str, a0: torch.Tensor, t1: torch.Tensor, context, mask=None, real=None
    ):
        shape = [a0.shape[0]] + [1] * (a0.ndim - 1)
        u = torch.rand(shape, device=a0.device, dtype=a0.dtype)
        x_u = (1 - u) * a0 + u * t1
        if self.sigma > 0:
            x_u = x_u + self.sigma * torch.randn_like(x_u)
        v = self.velocities[key](x_u, u.reshape(-1), **self._extras(key, a0, context, real))
        return self._mse(v, t1 - a0, mask)

    # ------------------------------------------------------------------ inference
    def deployed_modules(self) -> list[nn.Module]:
        if self.inference == "student":
            return [self.student]
        return [self.student, self.velocities[f"p{len(self.pairs) - 1}"]]

    @torch.no_grad()
    def predict(self, inputs: Any) -> torch.Tensor:
        s_out = self.student_forward(inputs)
        if self.inference == "student":
            return s_out[LOGITS]
        key = f"p{len(self.pairs) - 1}"
        real = input_segments(inputs)
        context = self._context(s_out, real, documents=True)
        logits = _wide(s_out[LOGITS])
        return self._transport(key, logits, 1.0, self.steps, context, True, real=real)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, float]:
        """Per pair, on a batch held from the epoch: transport and round-trip errors and
        the teacher features' negative log-likelihood per dimension under the flow (the
        errors over the real tokens of a padded dict batch, where the likelihood is left
        out)."""
        if not self.use_flow or self._held is None:
            return {}
        was_training = self.training
        self.eval()
        try:
            return self._diagnose(self._held)
        finally:
            self.train(was_training)

    def _diagnose(self, x: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        context, pairs = self.endpoints(x)
        segs = input_segments(x)
        mask = segs > 0 if segs is not None else None
        for key, s_name, a, t in pairs:
            name = "logits" if s_name == LOGITS else s_name
            extras = self._extras(key, a, context, segs)
            ctx = extras["context"]
            real = per_token(mask, a)
            # errors over the real tokens of a padded batch, each token a row
            rel = _rel if real is None else (lambda u, w, m=real: _rel(u[m], w[m]))
            with torch.no_grad():
                moved = self._transport(key, a, 1.0, self.steps, context, True, real=segs)
                out[f"{name}/adapter_error"] = rel(a, t)
                out[f"{name}/transport_error"] = rel(moved, t)
                # the map the student trains through, run backwards with its own solver
                # and steps: what its discretisation loses
                undone = self._transport(
                    key, moved, 1.0, self.steps, context, True, backward=True, real=segs
                )
                out[f"{name}/transport_roundtrip_error"] = rel(undone, a)
                more = {k: v for k, v in extras.items() if k != "context"}
                exact = FlowMap(
                    lambda z, u, context=None, net=self.velocities[key], more=more: net(
                        z, u, context=context, **more
                    ),
                    steps=32,
                    method="rk4",
                )
                back = exact.inverse(exact(a, context=ctx), context=ctx)
                out[f"{name}/roundtrip_error"] = rel(back, a)
            if real is None:  # (its density would count the padded positions of a batch)
                out[f"{name}/teacher_nll"] = self._teacher_nll(exact, a, t, ctx)
        return out

    @staticmethod
    def _teacher_nll(flow: FlowMap, a: torch.Tensor, t: torch.Tensor, context) -> float:
        # base density: a diagonal Gaussian fitted to the adapter outputs of the batch
        mu, sd = a.mean(0, keepdim=True), a.std(0, keepdim=True).clamp_min(1e-3)

        def base(z):
            per = -0.5 * ((z - mu) / sd) ** 2 - sd.log() - 0.5 * math.log(2 * math.pi)
            return per.flatten(1).sum(1)

        gen = torch.Generator(device=a.device).manual_seed(0)
        with torch.no_grad():
            logp = flow.log_prob(t, base, estimator="hutchinson", generator=gen, context=context)
        return float(-logp.mean() / t[0].numel())


# ablations: FlowDistill without each of its three parts
register_variant(
    "flowdistill-noinv", "flowdistill", "without the invertible flow (adapter regression)",
    flow=False,
)  # fmt: skip
register_variant(
    "flowdistill-noprog", "flowdistill", "without progressive transfer",
    progressive_target=False, progressive_steps=False, progressive_stages=False,
)  # fmt: skip
register_variant(
    "flowdistill-nocond", "flowdistill", "without the conditional velocity field",
    conditional=False,
)  # fmt: skip
register_variant(
    "flowdistill-anchored", "flowdistill",
    "the adapter output also matched to the teacher directly, the target not ramped",
    anchor_weight=1.0, progressive_target=False,
)  # fmt: skip
register_variant(
    "flowdistill-spatial", "flowdistill",
    "a spatial velocity field: 3×3 convolutions (attention over tokens), hidden 64",
    field="spatial", hidden=64,
)  # fmt: skip

r"""Probability paths between a source ``x0`` (t = 0) and a target ``x1`` (t = 1).

Convention used throughout :mod:`flowdistill.flows`:

* ``t = 0`` is the *source* ``x0`` (e.g. student features or Gaussian noise),
* ``t = 1`` is the *target* ``x1`` (e.g. teacher features or data).

Every path here is *affine* in the endpoints,

.. math::

    x_t = \alpha_t\, x_1 + \sigma_t\, x_0, \qquad
    \dot x_t = \dot\alpha_t\, x_1 + \dot\sigma_t\, x_0,

and a :class:`Scheduler` supplies :math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`.
Three schedules are provided:

* :class:`StraightScheduler` -- rectified flow / conditional optimal transport,
  :math:`\alpha_t = t`, :math:`\sigma_t = 1 - (1 - \sigma_{\min}) t`.
* :class:`VPScheduler` -- variance preserving, :math:`\alpha_t^2 + \sigma_t^2 = 1`,
  with :math:`\alpha_0 \approx 0, \sigma_0 \approx 1` and :math:`\alpha_1 = 1, \sigma_1 \approx 0`.
* :class:`VEScheduler` -- variance exploding, :math:`\alpha_t = 1` and
  :math:`\sigma_t` decreasing geometrically from :math:`\sigma_{\max}` to :math:`\sigma_{\min}`.

Times ``t`` have shape ``(B,)`` (or are scalars) and broadcast over the trailing
dimensions of ``x``.

Prediction types and conversions
--------------------------------
A network may predict the velocity :math:`v = \dot x_t`, the source ``x0``, the target
``x1``, or the "noise".  Since the source is the quantity multiplied by :math:`\sigma_t`,
the noise in this convention *is* ``x0``, so ``"noise"`` is an alias of ``"x0"``.
Given :math:`x_t` and one prediction, the others follow from the linear system

.. math::

    \begin{pmatrix} x_t \\ v \end{pmatrix} =
    \begin{pmatrix} \alpha_t & \sigma_t \\ \dot\alpha_t & \dot\sigma_t \end{pmatrix}
    \begin{pmatrix} x_1 \\ x_0 \end{pmatrix}, \qquad
    D_t = \alpha_t \dot\sigma_t - \sigma_t \dot\alpha_t,

so that :math:`x_1 = (\dot\sigma_t x_t - \sigma_t v) / D_t`,
:math:`x_0 = (\alpha_t v - \dot\alpha_t x_t) / D_t`,
:math:`x_0 = (x_t - \alpha_t x_1) / \sigma_t` and :math:`x_1 = (x_t - \sigma_t x_0)/\alpha_t`.
Conversions divide by :math:`D_t`, :math:`\sigma_t` or :math:`\alpha_t` and are therefore
ill-conditioned where those vanish (e.g. converting from ``x1`` at ``t = 1`` where
:math:`\sigma_1 = 0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._utils import TimeLike, as_batch_time, broadcast_time

__all__ = [
    "PATHS",
    "PREDICTION_TYPES",
    "AffinePath",
    "PathSample",
    "Scheduler",
    "SchedulerOutput",
    "StraightPath",
    "StraightScheduler",
    "VEPath",
    "VEScheduler",
    "VPPath",
    "VPScheduler",
    "get_path",
]

#: Names accepted by :meth:`AffinePath.convert` ("noise" is an alias of "x0").
PREDICTION_TYPES = ("velocity", "x0", "x1", "noise")


@dataclass(frozen=True)
class SchedulerOutput:
    r"""Values of a schedule at times ``t`` (all with the shape of ``t``).

    Attributes:
        alpha_t: :math:`\alpha_t`, the coefficient of the target ``x1``.
        sigma_t: :math:`\sigma_t`, the coefficient of the source ``x0``.
        d_alpha_t: :math:`\mathrm{d}\alpha_t / \mathrm{d}t`.
        d_sigma_t: :math:`\mathrm{d}\sigma_t / \mathrm{d}t`.
    """

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


class Scheduler:
    r"""Base class: maps a time tensor ``t`` to :class:`SchedulerOutput` elementwise.

    Subclasses implement :meth:`__call__`; ``t`` may have any shape and the outputs have
    the same shape, dtype and device as ``t``.
    """

    def __call__(self, t: Tensor) -> SchedulerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class StraightScheduler(Scheduler):
    r"""Straight (rectified-flow / conditional-OT) schedule.

    .. math::

        \alpha_t = t, \quad \sigma_t = 1 - (1 - \sigma_{\min})\, t, \quad
        \dot\alpha_t = 1, \quad \dot\sigma_t = -(1 - \sigma_{\min}).

    With ``sigma_min = 0`` the path is the straight line from ``x0`` to ``x1`` and the
    target velocity is the constant ``x1 - x0``.

    Args:
        sigma_min: residual source weight at ``t = 1`` (``0 <= sigma_min < 1``).
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must lie in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        k = 1.0 - self.sigma_min
        return SchedulerOutput(
            alpha_t=t,
            sigma_t=1.0 - k * t,
            d_alpha_t=torch.ones_like(t),
            d_sigma_t=torch.full_like(t, -k),
        )


class VPScheduler(Scheduler):
    r"""Variance-preserving schedule, :math:`\alpha_t^2 + \sigma_t^2 = 1`.

    ``schedule="cosine"`` (default) uses

    .. math::

        \alpha_t = \sin(\tfrac{\pi}{2} t), \quad \sigma_t = \cos(\tfrac{\pi}{2} t),

    which reaches both endpoints exactly (up to rounding of :math:`\cos(\pi/2)`).

    ``schedule="linear"`` is the linear-:math:`\beta` VP-SDE schedule written in diffusion
    time :math:`s = 1 - (1 - \epsilon) t \in [\epsilon, 1]` (so ``t = 1`` is the clean target):

    .. math::

        \beta(s) = \beta_{\min} + s(\beta_{\max} - \beta_{\min}), \quad
        \alpha_t = \exp\!\Big(-\tfrac12 \int_0^{s} \beta\Big)
                 = \exp\!\big(-\tfrac12 s\beta_{\min} - \tfrac14 s^2\Delta\beta\big),
        \quad \sigma_t = \sqrt{1 - \alpha_t^2},

    where :math:`\Delta\beta = \beta_{\max} - \beta_{\min}`,

    with :math:`\dot\alpha_t = \tfrac12 (1-\epsilon)\beta(s)\alpha_t` and
    :math:`\dot\sigma_t = -\alpha_t\dot\alpha_t/\sigma_t`.  The offset :math:`\epsilon` keeps
    :math:`\sigma_1 \approx \sqrt{\epsilon\beta_{\min}}` strictly positive so the derivative
    stays finite; :math:`\alpha_0 = e^{-(\beta_{\min}/2 + (\beta_{\max}-\beta_{\min})/4)}`
    (about ``6.6e-3`` for the defaults).

    Args:
        schedule: ``"cosine"`` or ``"linear"``.
        beta_min, beta_max: noise rates of the linear schedule.
        eps: smallest diffusion time of the linear schedule.
    """

    def __init__(
        self,
        schedule: str = "cosine",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        eps: float = 1e-5,
    ) -> None:
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        if not 0.0 < beta_min <= beta_max:
            raise ValueError("need 0 < beta_min <= beta_max")
        if not 0.0 < eps < 1.0:
            raise ValueError("eps must lie in (0, 1)")
        self.schedule = schedule
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.eps = float(eps)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        if self.schedule == "cosine":
            half_pi = 0.5 * math.pi
            alpha, sigma = torch.sin(half_pi * t), torch.cos(half_pi * t)
            return SchedulerOutput(alpha, sigma, half_pi * sigma, -half_pi * alpha)
        ds_dt = -(1.0 - self.eps)
        s = 1.0 + ds_dt * t
        span = self.beta_max - self.beta_min
        log_alpha = -0.5 * s * self.beta_min - 0.25 * s**2 * span
        alpha = torch.exp(log_alpha)
        # sigma = sqrt(1 - alpha^2) = sqrt(-expm1(2 log alpha)), accurate near alpha = 1.
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))
        beta = self.beta_min + s * span
        d_alpha = -0.5 * beta * ds_dt * alpha
        d_sigma = -alpha * d_alpha / sigma
        return SchedulerOutput(alpha, sigma, d_alpha, d_sigma)


class VEScheduler(Scheduler):
    r"""Variance-exploding schedule: :math:`x_t = x_1 + \sigma_t x_0`.

    .. math::

        \alpha_t = 1, \quad
        \sigma_t = \sigma_{\min}\,(\sigma_{\max}/\sigma_{\min})^{1 - t}, \quad
        \dot\alpha_t = 0, \quad
        \dot\sigma_t = -\log(\sigma_{\max}/\sigma_{\min})\,\sigma_t.

    :math:`\sigma_t` decreases from :math:`\sigma_{\max}` at ``t = 0`` to
    :math:`\sigma_{\min} \approx 0` at ``t = 1``, so ``x_1`` is reached up to
    :math:`\sigma_{\min}` while ``x_{t=0} = x_1 + \sigma_{\max} x_0`` is dominated by the source
    only when :math:`\sigma_{\max}` is large compared with the scale of ``x1``.

    Args:
        sigma_min: final noise level (``> 0``).
        sigma_max: initial noise level (``> sigma_min``); a common rule of thumb is the
            largest pairwise distance between targets.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        sigma = self.sigma_min * torch.exp(log_ratio * (1.0 - t))
        return SchedulerOutput(
            alpha_t=torch.ones_like(t),
            sigma_t=sigma,
            d_alpha_t=torch.zeros_like(t),
            d_sigma_t=-log_ratio * sigma,
        )


@dataclass
class PathSample:
    r"""A point on a path: ``x_t`` and the target (conditional) velocity ``dx_t``.

    Attributes:
        x_t: :math:`\alpha_t x_1 + \sigma_t x_0`, shape of ``x0``.
        dx_t: :math:`\dot\alpha_t x_1 + \dot\sigma_t x_0`, the regression target of a
            velocity network.
        t: times, shape ``(B,)``.
        x0: the source sample.
        x1: the target sample.
    """

    x_t: Tensor
    dx_t: Tensor
    t: Tensor
    x0: Tensor
    x1: Tensor


class AffinePath:
    r"""Affine interpolation :math:`x_t = \alpha_t x_1 + \sigma_t x_0` for a :class:`Scheduler`.

    Example::

        path = AffinePath(StraightScheduler())
        s = path.sample(x0, x1, t)          # s.x_t, s.dx_t
        x1_hat = path.velocity_to_x1(s.dx_t, s.x_t, t)
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheduler!r})"

    def coefficients(self, t: TimeLike, like: Tensor) -> SchedulerOutput:
        """Scheduler values with ``t`` broadcast to ``(B, 1, ..., 1)`` against ``like``."""
        return self.scheduler(broadcast_time(t, like))

    def sample(self, x0: Tensor, x1: Tensor, t: TimeLike) -> PathSample:
        """Return ``x_t`` and the target velocity ``dx_t`` for endpoints ``x0``, ``x1``.

        Args:
            x0: source samples ``(B, ...)``.
            x1: target samples, same shape as ``x0``.
            t: times, a scalar or ``(B,)``.
        """
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have equal shapes, got {x0.shape} and {x1.shape}")
        c = self.coefficients(t, x0)
        x_t = c.alpha_t * x1 + c.sigma_t * x0
        dx_t = c.d_alpha_t * x1 + c.d_sigma_t * x0
        return PathSample(x_t=x_t, dx_t=dx_t, t=as_batch_time(t, x0), x0=x0, x1=x1)

    # ------------------------------------------------------------------ conversions
    def _endpoints(self, value: Tensor, x_t: Tensor, c: SchedulerOutput, kind: str):
        # Returns (x0, x1) consistent with x_t and the given prediction.
        if kind == "x1":
            return (x_t - c.alpha_t * value) / c.sigma_t, value
        if kind in ("x0", "noise"):
            return value, (x_t - c.sigma_t * value) / c.alpha_t
        det = c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t
        x1 = (c.d_sigma_t * x_t - c.sigma_t * value) / det
        x0 = (c.alpha_t * value - c.d_alpha_t * x_t) / det
        return x0, x1

    def convert(
        self,
        value: Tensor,
        x_t: Tensor,
        t: TimeLike,
        source: str = "velocity",
        target: str = "x1",
    ) -> Tensor:
        """Convert a prediction of type ``source`` at ``(x_t, t)`` into type ``target``.

        Both types are one of :data:`PREDICTION_TYPES` (``"velocity"``, ``"x0"``, ``"x1"``,
        ``"noise"``; ``"noise"`` is the same as ``"x0"``).
        """
        for name in (source, target):
            if name not in PREDICTION_TYPES:
                raise ValueError(
                    f"unknown prediction type {name!r}; expected one of {PREDICTION_TYPES}"
                )
        if source == target or {source, target} == {"x0", "noise"}:
            return value
        c = self.coefficients(t, x_t)
        x0, x1 = self._endpoints(value, x_t, c, source)
        if target == "x1":
            return x1
        if target in ("x0", "noise"):
            return x0
        return c.d_alpha_t * x1 + c.d_sigma_t * x0

    def velocity_to_x1(self, velocity: Tensor, x_t: Tensor, t: TimeLike) -> Tensor:
        r""":math:`x_1 = (\dot\sigma_t x_t - \sigma_t v) / D_t`."""
        return self.convert(velocity, x_t, t, "velocity", "x1")

    def velocity_to_x0(self, velocity: Tensor, x_t: Tensor, t: TimeLike) -> Tensor:
        r""":math:`x_0 = (\alpha_t v - \dot\alpha_t x_t) / D_t` (also the noise prediction)."""
        return self.convert(velocity, x_t, t, "velocity", "x0")

    def x1_to_velocity(self, x1: Tensor, x_t: Tensor, t: TimeLike) -> Tensor:
        r""":math:`v = \dot\alpha_t x_1 + \dot\sigma_t (x_t - \alpha_t x_1)/\sigma_t`."""
        return self.convert(x1, x_t, t, "x1", "velocity")

    def x0_to_velocity(self, x0: Tensor, x_t: Tensor, t: TimeLike) -> Tensor:
        r""":math:`v = \dot\alpha_t (x_t - \sigma_t x_0)/\alpha_t + \dot\sigma_t x_0`."""
        return self.convert(x0, x_t, t, "x0", "velocity")


class StraightPath(AffinePath):
    """:class:`AffinePath` with a :class:`StraightScheduler` (rectified flow / CondOT)."""

    def __init__(self, sigma_min: float = 0.0) -> None:
        super().__init__(StraightScheduler(sigma_min))


class VPPath(AffinePath):
    """:class:`AffinePath` with a :class:`VPScheduler` (arguments are forwarded)."""

    def __init__(self, schedule: str = "cosine", **kwargs: Any) -> None:
        super().__init__(VPScheduler(schedule, **kwargs))


class VEPath(AffinePath):
    """:class:`AffinePath` with a :class:`VEScheduler` (arguments are forwarded)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0) -> None:
        super().__init__(VEScheduler(sigma_min, sigma_max))


#: Name -> path class, used by :func:`get_path`.
PATHS: dict[str, type[AffinePath]] = {
    "straight": StraightPath,
    "rectified": StraightPath,
    "cond_ot": StraightPath,
    "vp": VPPath,
    "ve": VEPath,
}


def get_path(name: str, **kwargs: Any) -> AffinePath:
    """Build a path by name (``"straight"``/``"rectified"``/``"cond_ot"``, ``"vp"``, ``"ve"``)."""
    try:
        cls = PATHS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown path {name!r}; known paths: {sorted(PATHS)}") from None
    return cls(**kwargs)

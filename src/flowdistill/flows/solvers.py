r"""ODE solvers for :math:`\mathrm{d}x/\mathrm{d}t = f(t, x)`.

:func:`odeint` follows the calling convention of ``torchdiffeq.odeint``:
``func(t, x)`` receives a 0-d tensor ``t`` and returns ``dx/dt`` with the shape of ``x``;
``t`` is a 1-D tensor of output times (strictly increasing or strictly decreasing) and the
result stacks the states at those times, shape ``(len(t), *x0.shape)``, with
``result[0] == x0``.

Methods (see :data:`SOLVERS`), with step :math:`h` and :math:`k_1 = f(t, x)`:

* ``euler`` (order 1): :math:`x + h k_1`;
* ``midpoint`` (order 2): :math:`x + h f(t + h/2, x + h k_1 / 2)`;
* ``heun`` (order 2, explicit trapezoid): :math:`x + \tfrac h2 (k_1 + f(t + h, x + h k_1))`;
* ``rk4`` (order 4, classical Runge--Kutta):
  :math:`x + \tfrac h6 (k_1 + 2k_2 + 2k_3 + k_4)`;
* ``dopri5`` (order 5 with embedded order-4 error estimate, adaptive).

Fixed-step methods take ``options={"step_size": h}``; each output interval
:math:`[t_i, t_{i+1}]` is split into :math:`\lceil |t_{i+1} - t_i| / h \rceil` equal steps
so that the output times are hit exactly.  Without ``step_size`` one step is taken per
interval.

``dopri5`` controls the local error :math:`e` (difference of the 5th and 4th order
solutions) in the root-mean-square norm

.. math::

    \|e\| = \sqrt{\tfrac1N \textstyle\sum_i \big(e_i / (\mathrm{atol} + \mathrm{rtol}
            \max(|x_i|, |x^{new}_i|))\big)^2}

and accepts a step when :math:`\|e\| \le 1`; the next step is
:math:`h \cdot \min(\mathrm{ifactor}, \max(\mathrm{dfactor},\ 0.9\,\|e\|^{-1/5}))`.
Steps are shortened to land on every output time.  Options: ``first_step``,
``max_num_steps`` (default 100000), ``safety`` (0.9), ``ifactor`` (10), ``dfactor`` (0.2).
``options={"backend": "torchdiffeq"}`` delegates any method to ``torchdiffeq`` (note that
torchdiffeq's ``rk4`` is the 3/8-rule variant).

Gradients flow through the solver's operations by ordinary autograd (no adjoint).
``grad=False`` runs the solve under :func:`torch.no_grad`.  Gradients with respect to the
output times ``t`` are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "SOLVERS",
    "Dopri5",
    "Euler",
    "FixedStepSolver",
    "Heun",
    "Midpoint",
    "RK4",
    "Solver",
    "odeint",
    "register_solver",
]

ODEFunc = Callable[[Tensor, Tensor], Tensor]

#: Registry of native solvers: method name -> :class:`Solver` subclass.
SOLVERS: dict[str, type[Solver]] = {}


def register_solver(name: str) -> Callable[[type[Solver]], type[Solver]]:
    """Class decorator adding a :class:`Solver` subclass to :data:`SOLVERS` under ``name``."""

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = cls
        cls.name = name
        return cls

    return deco


class Solver:
    """Base class of the native solvers.

    Args:
        func: the vector field ``func(t, x)``.
        rtol, atol: tolerances (used by adaptive solvers only).
        options: solver-specific options; unknown keys raise ``ValueError``.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    option_names: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, func: ODEFunc, rtol: float, atol: float, options: dict[str, Any] | None
    ) -> None:
        options = dict(options or {})
        unknown = set(options) - set(self.option_names)
        if unknown:
            raise ValueError(
                f"unknown options {sorted(unknown)} for method {self.name!r}; "
                f"allowed: {sorted(self.option_names)}"
            )
        self.func = func
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.options = options
        self.nfe = 0  # number of function evaluations of the last solve

    def f(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        dx = self.func(t, x)
        if not isinstance(dx, Tensor) or dx.shape != x.shape:
            shape = tuple(dx.shape) if isinstance(dx, Tensor) else type(dx).__name__
            raise ValueError(
                f"func(t, x) must return a tensor of shape {tuple(x.shape)}, got {shape}"
            )
        return dx

    def integrate(self, x0: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the states at times ``t``, shape ``(len(t), *x0.shape)``."""
        raise NotImplementedError


class FixedStepSolver(Solver):
    """Explicit one-step method with a fixed step; subclasses implement :meth:`step`."""

    option_names = frozenset({"step_size"})

    def step(self, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:  # pragma: no cover
        """Advance ``x`` from time ``t`` by ``dt`` (0-d tensors, ``dt`` may be negative)."""
        raise NotImplementedError

    def integrate(self, x0: Tensor, t: Tensor) -> Tensor:
        h = self.options.get("step_size")
        if h is not None and not (float(h) > 0 and math.isfinite(float(h))):
            raise ValueError(f"step_size must be a positive finite number, got {h!r}")
        states = [x0]
        x = x0
        for i in range(len(t) - 1):
            span = t[i + 1] - t[i]  # 0-d
            n = 1 if h is None else max(1, math.ceil(abs(float(span)) / float(h) - 1e-9))
            dt = span / n
            for k in range(n):
                x = self.step(t[i] + dt * k, dt, x)
            states.append(x)
        return torch.stack(states)


@register_solver("euler")
class Euler(FixedStepSolver):
    """Forward Euler, order 1."""

    order = 1

    def step(self, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
        return x + dt * self.f(t, x)


@register_solver("midpoint")
class Midpoint(FixedStepSolver):
    """Explicit midpoint rule, order 2."""

    order = 2

    def step(self, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
        half = 0.5 * dt
        k1 = self.f(t, x)
        return x + dt * self.f(t + half, x + half * k1)


@register_solver("heun")
class Heun(FixedStepSolver):
    """Heun's method (explicit trapezoidal rule), order 2."""

    order = 2

    def step(self, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
        k1 = self.f(t, x)
        k2 = self.f(t + dt, x + dt * k1)
        return x + 0.5 * dt * (k1 + k2)


@register_solver("rk4")
class RK4(FixedStepSolver):
    """Classical fourth-order Runge--Kutta method."""

    order = 4

    def step(self, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
        half = 0.5 * dt
        k1 = self.f(t, x)
        k2 = self.f(t + half, x + half * k1)
        k3 = self.f(t + half, x + half * k2)
        k4 = self.f(t + dt, x + dt * k3)
        return x + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def _floats(*xs: str | int) -> list[float]:
    return [float(Fraction(x)) for x in xs]


# Dormand--Prince 5(4) tableau (J. R. Dormand and P. J. Prince, 1980): nodes c_i,
# stage coefficients a_ij, 5th-order weights b_i (equal to the last stage row: FSAL)
# and embedded 4th-order weights b*_i; the error estimate uses e_i = b_i - b*_i.
_DP_C = _floats(0, "1/5", "3/10", "4/5", "8/9", 1, 1)
_DP_A = [
    [],
    _floats("1/5"),
    _floats("3/40", "9/40"),
    _floats("44/45", "-56/15", "32/9"),
    _floats("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
    _floats("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
    _floats("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"),
]
_DP_B5 = [*_DP_A[6], 0.0]
_DP_E = [
    float(Fraction(b) - Fraction(bs))
    for b, bs in zip(
        ["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0],
        ["5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40"],
        strict=True,
    )
]


def _combine(coeffs: list[float], ks: list[Tensor]) -> Tensor:
    # sum_j coeffs[j] * ks[j], skipping zero coefficients
    terms = [c * k for c, k in zip(coeffs, ks, strict=False) if c != 0.0]
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def _rms(x: Tensor) -> float:
    return float(torch.sqrt(torch.mean(x.detach().abs() ** 2)))


@register_solver("dopri5")
class Dopri5(Solver):
    """Adaptive Dormand--Prince 5(4) Runge--Kutta method with FSAL and step-size control."""

    order = 5
    option_names = frozenset({"first_step", "max_num_steps", "safety", "ifactor", "dfactor"})

    def _initial_step(self, t0: float, x0: Tensor, f0: Tensor, direction: float) -> float:
        # Hairer, Norsett & Wanner, "Solving ODEs I", II.4: starting step size.
        scale = self.atol + self.rtol * x0.detach().abs()
        d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        x1 = x0 + direction * h0 * f0
        f1 = self.f(self._time(t0 + direction * h0, x0), x1)
        d2 = _rms((f1 - f0) / scale) / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / self.order)
        return min(100 * h0, h1)

    @staticmethod
    def _time(value: float, like: Tensor) -> Tensor:
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    def integrate(self, x0: Tensor, t: Tensor) -> Tensor:
        opts = self.options
        safety = float(opts.get("safety", 0.9))
        ifactor = float(opts.get("ifactor", 10.0))
        dfactor = float(opts.get("dfactor", 0.2))
        max_steps = int(opts.get("max_num_steps", 100_000))
        times = [float(v) for v in t]
        direction = 1.0 if len(times) < 2 or times[-1] > times[0] else -1.0

        states = [x0]
        if len(times) == 1:
            return torch.stack(states)
        x, t_now = x0, times[0]
        k1 = self.f(self._time(t_now, x), x)
        if "first_step" in opts:
            h = abs(float(opts["first_step"]))
        else:
            h = self._initial_step(t_now, x, k1, direction)
        n_steps = 0
        for t_out in times[1:]:
            while direction * (t_out - t_now) > 0:
                if n_steps >= max_steps:
                    raise RuntimeError(f"dopri5: max_num_steps={max_steps} exceeded")
                n_steps += 1
                remaining = abs(t_out - t_now)
                clipped = h >= remaining
                h_use = remaining if clipped else h
                if h_use <= 1e-14 * max(1.0, abs(t_now)):
                    raise RuntimeError(f"dopri5: step size underflow at t={t_now}")
                x_new, k7, err = self._step(t_now, direction * h_use, x, k1)
                scale = self.atol + self.rtol * torch.maximum(
                    x.detach().abs(), x_new.detach().abs()
                )
                err_norm = _rms(err / scale)
                if not math.isfinite(err_norm):
                    h = h_use * dfactor
                    continue
                factor = ifactor if err_norm == 0 else safety * err_norm ** (-1.0 / self.order)
                factor = min(ifactor, max(dfactor, factor))
                if err_norm <= 1.0:
                    x, k1 = x_new, k7
                    t_now = t_out if clipped else t_now + direction * h_use
                    h = max(h_use * factor, h) if clipped else h_use * factor
                else:
                    h = h_use * min(1.0, factor)
            states.append(x)
        return torch.stack(states)

    def _step(self, t0: float, h: float, x: Tensor, k1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ks = [k1]  # stage derivatives k_1..k_7, each shaped like x
        for i in range(1, 7):
            x_i = x + h * _combine(_DP_A[i], ks)
            ks.append(self.f(self._time(t0 + _DP_C[i] * h, x), x_i))
        x_new = x + h * _combine(_DP_B5, ks)  # 5th order solution
        err = h * _combine(_DP_E, ks)  # 5th minus embedded 4th order solution
        return x_new, ks[6], err


def _check_times(t: Tensor, values: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise ValueError("t must be a 1-D tensor of times")
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if not values:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError("t must be finite")
    if t.numel() > 1:
        d = t[1:] - t[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("t must be strictly increasing or strictly decreasing")


def odeint(
    func: ODEFunc,
    x0: Tensor,
    t: Tensor,
    method: str = "rk4",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: dict[str, Any] | None = None,
    *,
    grad: bool = True,
    check_times: bool = True,
) -> Tensor:
    """Solve ``dx/dt = func(t, x)`` from ``x(t[0]) = x0`` and return ``x`` at every ``t``.

    Args:
        func: vector field ``func(t, x) -> dx/dt``; ``t`` is a 0-d tensor.
        x0: initial state (any shape, floating point).
        t: 1-D tensor of output times, strictly monotonic (increasing or decreasing).
        method: a key of :data:`SOLVERS` (``"euler"``, ``"midpoint"``, ``"heun"``,
            ``"rk4"``, ``"dopri5"``) or, with the torchdiffeq backend, any torchdiffeq method.
        rtol, atol: relative / absolute tolerances of adaptive methods.
        options: solver options, e.g. ``{"step_size": 0.1}``;
            ``{"backend": "torchdiffeq"}`` delegates the solve to torchdiffeq.
        grad: if ``False`` the solve runs under :func:`torch.no_grad`.
        check_times: check that ``t`` is finite and strictly monotonic. Reading the values
            of ``t`` waits for its device (and breaks a ``torch.compile`` graph), so a
            training step that builds its own grid (``torch.linspace``) passes ``False``.

    Returns:
        Tensor of shape ``(len(t), *x0.shape)``.

    Raises:
        ValueError: unknown method or option, bad ``t`` or ``x0``.
        ImportError: the torchdiffeq backend was requested but is not installed.
    """
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise ValueError("x0 must be a floating-point tensor")
    _check_times(t, values=check_times)
    options = dict(options or {})
    backend = options.pop("backend", "native")
    if backend not in ("native", "torchdiffeq"):
        raise ValueError(f"unknown backend {backend!r}; expected 'native' or 'torchdiffeq'")
    if backend == "native" and method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(SOLVERS)}")
    t = t.to(device=x0.device, dtype=x0.dtype)

    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if backend == "torchdiffeq":
            try:
                import torchdiffeq
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "options={'backend': 'torchdiffeq'} requires the torchdiffeq package"
                ) from exc
            return torchdiffeq.odeint(
                func, x0, t, rtol=rtol, atol=atol, method=method, options=options or None
            )
        solver = SOLVERS[method](func, rtol, atol, options)
        return solver.integrate(x0, t)

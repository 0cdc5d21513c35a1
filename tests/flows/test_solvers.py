"""ODE solvers against closed-form solutions, torchdiffeq and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from flowdistill.flows import SOLVERS, FixedStepSolver, odeint, register_solver

F64 = torch.float64
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
OMEGA = 2.0
ROT = torch.tensor([[0.0, -OMEGA], [OMEGA, 0.0]], dtype=F64)


def _exp_growth():
    x0 = torch.tensor([1.0, -2.0], dtype=F64)
    return (lambda t, x: 0.7 * x), x0, (lambda t: x0 * math.exp(0.7 * t))


def _gaussian_decay():
    x0 = torch.tensor([1.5, 0.5], dtype=F64)
    return (lambda t, x: -t * x), x0, (lambda t: x0 * math.exp(-0.5 * t * t))


def _rotation():
    x0 = torch.tensor([1.0, 0.0], dtype=F64)

    def exact(t):
        return torch.tensor([math.cos(OMEGA * t), math.sin(OMEGA * t)], dtype=F64)

    return (lambda t, x: ROT @ x), x0, exact


PROBLEMS = {"exp": _exp_growth, "decay": _gaussian_decay, "rotation": _rotation}


def _error(method: str, problem: str, n: int) -> float:
    func, x0, exact = PROBLEMS[problem]()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = odeint(func, x0, t, method=method, options={"step_size": 1.0 / n})
    return float((sol[-1] - exact(1.0)).norm())


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("method", sorted(ORDERS))
def test_fixed_step_convergence_order(method, problem):
    p = ORDERS[method]
    n = {1: 64, 2: 32, 4: 16}[p]
    e1, e2 = _error(method, problem, n), _error(method, problem, 2 * n)
    ratio = e1 / e2
    assert 0.8 * 2**p <= ratio <= 1.25 * 2**p, (e1, e2, ratio)


def test_many_output_times_equal_substeps():
    func, x0, _ = _gaussian_decay()
    dense = odeint(func, x0, torch.linspace(0, 1, 11, dtype=F64), method="rk4")
    coarse = odeint(
        func, x0, torch.tensor([0.0, 1.0], dtype=F64), "rk4", options={"step_size": 0.1}
    )
    torch.testing.assert_close(dense[-1], coarse[-1], atol=1e-14, rtol=0)
    assert dense.shape == (11, 2) and torch.equal(dense[0], x0)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_dopri5_within_tolerance(problem):
    func, x0, exact = PROBLEMS[problem]()
    t = torch.linspace(0, 1, 5, dtype=F64)
    errs = []
    for rtol in (1e-5, 1e-8, 1e-11):
        sol = odeint(func, x0, t, method="dopri5", rtol=rtol, atol=rtol * 1e-2)
        err = max(float((sol[i] - exact(float(t[i]))).norm()) for i in range(len(t)))
        assert err < 50 * rtol, (rtol, err)
        errs.append(err)
    assert errs[2] < errs[1] < errs[0]


def test_dopri5_adapts_to_fast_dynamics():
    # dx/dt = cos(40 t), x(0) = 0  =>  x(t) = sin(40 t) / 40
    func = lambda t, x: torch.cos(40 * t) * torch.ones_like(x)  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = odeint(func, torch.zeros(1, dtype=F64), t, method="dopri5", rtol=1e-9, atol=1e-11)
    assert abs(sol[-1].item() - math.sin(40.0) / 40) < 1e-8


@pytest.mark.parametrize("method", [*sorted(ORDERS), "dopri5"])
def test_decreasing_time(method):
    func, _, exact = _exp_growth()
    t = torch.linspace(1.0, 0.0, 5, dtype=F64)
    opts = None if method == "dopri5" else {"step_size": 1 / 256}
    sol = odeint(func, exact(1.0), t, method=method, options=opts)
    tol = {1: 1e-2, 2: 1e-4, 4: 1e-9, 5: 1e-6}[ORDERS.get(method, 5)]
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(sol[i], exact(ti), atol=tol, rtol=0)


def test_single_time_returns_initial_state():
    x0 = torch.randn(3, dtype=F64)
    for method in SOLVERS:
        sol = odeint(lambda t, x: x, x0, torch.tensor([0.3], dtype=F64), method=method)
        assert sol.shape == (1, 3) and torch.equal(sol[0], x0)


def test_derivative_matches_analytic():
    """d x(1) / d x0 = e^{0.7} for dx/dt = 0.7 x (autograd through the solve)."""
    func, _, _ = _exp_growth()
    x0 = torch.ones(1, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for method, opts in (("rk4", {"step_size": 1 / 32}), ("dopri5", None)):
        x1 = odeint(func, x0, t, method=method, options=opts)[-1]
        (g,) = torch.autograd.grad(x1.sum(), x0)
        assert abs(g.item() - math.exp(0.7)) < 1e-7


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "dopri5"])
def test_gradcheck_through_solve(method):
    theta = torch.tensor([0.8, -0.5], dtype=F64, requires_grad=True)
    x0 = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=F64, requires_grad=True)

    def solve(x0, theta):
        def func(t, x):
            return theta[0] * torch.tanh(x) + theta[1] * torch.sin(t) * x

        t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
        return odeint(
            func,
            x0,
            t,
            method=method,
            rtol=1e-6,
            atol=1e-8,
            options=None if method == "dopri5" else {"step_size": 0.25},
        )

    assert torch.autograd.gradcheck(solve, (x0, theta))


def test_grad_false_runs_without_graph():
    x0 = torch.randn(3, dtype=F64, requires_grad=True)
    sol = odeint(lambda t, x: -x, x0, torch.tensor([0.0, 1.0], dtype=F64), grad=False)
    assert not sol.requires_grad
    sol = odeint(lambda t, x: -x, x0, torch.tensor([0.0, 1.0], dtype=F64))
    assert sol.requires_grad


def test_float32_and_time_dtype_cast():
    x0 = torch.ones(2)
    sol = odeint(
        lambda t, x: -x, x0, torch.tensor([0.0, 1.0], dtype=F64), "rk4", options={"step_size": 0.1}
    )
    assert sol.dtype == torch.float32
    assert abs(sol[-1, 0].item() - math.exp(-1)) < 1e-5


def test_func_receives_zero_dim_time():
    seen = []

    def func(t, x):
        seen.append(t)
        return -x

    odeint(func, torch.ones(2), torch.tensor([0.0, 1.0]), "midpoint")
    odeint(func, torch.ones(2), torch.tensor([0.0, 1.0]), "dopri5")
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in seen)


def test_validation_errors():
    x0 = torch.ones(2)
    f = lambda t, x: -x  # noqa: E731
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="known methods: .*rk4"):
        odeint(f, x0, t, method="rk45")
    with pytest.raises(ValueError, match="1-D"):
        odeint(f, x0, t[None])
    with pytest.raises(ValueError, match="1-D"):
        odeint(f, x0, torch.tensor([]))
    with pytest.raises(ValueError, match="monotonic|increasing"):
        odeint(f, x0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="increasing"):
        odeint(f, x0, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        odeint(f, x0, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="unknown options"):
        odeint(f, x0, t, "rk4", options={"stepsize": 0.1})
    with pytest.raises(ValueError, match="step_size"):
        odeint(f, x0, t, "euler", options={"step_size": -1.0})
    with pytest.raises(ValueError, match="floating"):
        odeint(f, torch.ones(2, dtype=torch.long), t)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        odeint(lambda t, x: x[:1], x0, t)
    with pytest.raises(ValueError, match="backend"):
        odeint(f, x0, t, options={"backend": "scipy"})


def test_dopri5_max_num_steps():
    with pytest.raises(RuntimeError, match="max_num_steps"):
        odeint(
            lambda t, x: torch.cos(100 * t) * x,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            "dopri5",
            options={"max_num_steps": 3},
        )


def test_register_custom_solver():
    @register_solver("_test_ralston")
    class Ralston(FixedStepSolver):
        order = 2

        def step(self, t, dt, x):
            k1 = self.f(t, x)
            k2 = self.f(t + 2 * dt / 3, x + 2 * dt / 3 * k1)
            return x + dt * (0.25 * k1 + 0.75 * k2)

    try:
        assert SOLVERS["_test_ralston"] is Ralston
        func, x0, exact = _exp_growth()
        sol = odeint(
            func,
            x0,
            torch.tensor([0.0, 1.0], dtype=F64),
            "_test_ralston",
            options={"step_size": 1 / 64},
        )
        torch.testing.assert_close(sol[-1], exact(1.0), atol=1e-3, rtol=0)
        with pytest.raises(ValueError, match="already registered"):
            register_solver("_test_ralston")(Ralston)
    finally:
        SOLVERS.pop("_test_ralston", None)


# --------------------------------------------------------------------------- torchdiffeq
@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_matches_torchdiffeq_exactly(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, x0, _ = _gaussian_decay()
    t = torch.linspace(0, 1, 5, dtype=F64)
    ours = odeint(func, x0, t, method, options={"step_size": 0.125})
    ref = torchdiffeq.odeint(func, x0, t, method=method, options={"step_size": 0.125})
    torch.testing.assert_close(ours, ref, atol=1e-13, rtol=0)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_agrees_with_torchdiffeq(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, x0, _ = _rotation()
    t = torch.linspace(0, 1, 5, dtype=F64)
    opts = {"step_size": 1 / 64} if method == "rk4" else None
    ours = odeint(func, x0, t, method, rtol=1e-10, atol=1e-12, options=opts)
    ref = torchdiffeq.odeint(func, x0, t, method=method, rtol=1e-10, atol=1e-12, options=opts)
    torch.testing.assert_close(ours, ref, atol=1e-8, rtol=0)


def test_torchdiffeq_backend_delegates():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, x0, _ = _rotation()
    t = torch.linspace(0, 1, 3, dtype=F64)
    ours = odeint(func, x0, t, "dopri5", rtol=1e-6, atol=1e-8, options={"backend": "torchdiffeq"})
    ref = torchdiffeq.odeint(func, x0, t, method="dopri5", rtol=1e-6, atol=1e-8)
    assert torch.equal(ours, ref)

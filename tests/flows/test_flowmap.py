"""FlowMap: forward / inverse / log-determinants against closed-form Gaussian flows,
autograd Jacobians, and statistical checks of the Hutchinson estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowdistill.flows import ConvVelocity, FlowMap, MLPVelocity

F64 = torch.float64


class LinearVelocity(nn.Module):
    """v(x, t) = A x  =>  Phi(x) = expm(A) x,  log|det dPhi/dx| = tr(A)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x, t):
        return x @ self.a.T


class GaussianInterpolation(nn.Module):
    """Velocity of the affine map pushing N(m0, diag s0^2) to N(m1, diag s1^2).

    phi_t(x) = mu_t + (s_t / s0) (x - m0) with mu_t, s_t linear in t, so
    v(x, t) = mu' + (s' / s_t) (x - mu_t) and Phi(x) = m1 + (s1 / s0)(x - m0).
    """

    def __init__(self, m0, s0, m1, s1):
        super().__init__()
        self.m0, self.s0, self.m1, self.s1 = m0, s0, m1, s1

    def forward(self, x, t):
        t = t.reshape(-1, 1)
        mu = (1 - t) * self.m0 + t * self.m1
        s = (1 - t) * self.s0 + t * self.s1
        return (self.m1 - self.m0) + (self.s1 - self.s0) / s * (x - mu)


def _random_matrix(d: int, scale: float = 0.5) -> torch.Tensor:
    return scale * torch.randn(d, d, dtype=F64)


def _std_normal_logp(z):
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


@pytest.mark.parametrize("method,steps", [("rk4", 32), ("dopri5", 2)])
def test_linear_field_matches_matrix_exponential(method, steps):
    a = _random_matrix(3)
    flow = FlowMap(LinearVelocity(a), steps=steps, method=method, rtol=1e-10, atol=1e-12)
    x = torch.randn(5, 3, dtype=F64)
    expm = torch.linalg.matrix_exp(a)
    y = flow(x)
    torch.testing.assert_close(y, x @ expm.T, atol=1e-8, rtol=0)
    torch.testing.assert_close(flow.inverse(y), x, atol=1e-8, rtol=0)
    torch.testing.assert_close(
        flow.inverse(x), x @ torch.linalg.matrix_exp(-a).T, atol=1e-8, rtol=0
    )
    with torch.no_grad():
        y2, logdet = flow.forward_and_logdet(x, estimator="exact")
        x2, logdet_inv = flow.inverse_and_logdet(y, estimator="exact")
    torch.testing.assert_close(y2, y, atol=1e-10, rtol=0)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=0)
    trace = torch.trace(a).expand(5)
    torch.testing.assert_close(logdet, trace, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inv, -trace, atol=1e-10, rtol=0)


def test_linear_field_log_prob_matches_gaussian():
    a = _random_matrix(3)
    flow = FlowMap(LinearVelocity(a), steps=32, method="rk4")
    expm = torch.linalg.matrix_exp(a)
    # x ~ N(0, I)  =>  y = expm(A) x ~ N(0, M M^T)
    oracle = torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=F64), covariance_matrix=expm @ expm.T
    )
    y = torch.randn(7, 3, dtype=F64)
    with torch.no_grad():
        logp = flow.log_prob(y, _std_normal_logp)
    torch.testing.assert_close(logp, oracle.log_prob(y), atol=1e-8, rtol=0)


def test_time_dependent_gaussian_interpolation():
    d = 4
    m0, m1 = torch.randn(d, dtype=F64), torch.randn(d, dtype=F64)
    s0, s1 = 0.5 + torch.rand(d, dtype=F64), 0.5 + torch.rand(d, dtype=F64)
    flow = FlowMap(GaussianInterpolation(m0, s0, m1, s1), steps=16, method="rk4")
    x = m0 + s0 * torch.randn(6, d, dtype=F64)
    y, logdet = flow.forward_and_logdet(x)
    torch.testing.assert_close(y, m1 + s1 / s0 * (x - m0), atol=1e-8, rtol=0)
    torch.testing.assert_close(logdet, torch.log(s1 / s0).sum().expand(6), atol=1e-8, rtol=0)
    base = torch.distributions.Normal(m0, s0)
    target = torch.distributions.Normal(m1, s1)
    logp = flow.log_prob(y, lambda z: base.log_prob(z).sum(-1))
    torch.testing.assert_close(logp, target.log_prob(y).sum(-1), atol=1e-8, rtol=0)
    # trajectory passes through the interpolated Gaussians' affine maps
    traj = flow.trajectory(x)
    t = 0.25
    mu, s = (1 - t) * m0 + t * m1, (1 - t) * s0 + t * s1
    torch.testing.assert_close(traj[4], mu + s / s0 * (x - m0), atol=1e-8, rtol=0)


def test_fresh_flow_is_identity():
    flow = FlowMap(MLPVelocity(4, hidden=16, depth=1), steps=3)
    x = torch.randn(5, 4)
    assert torch.equal(flow(x), x)
    assert torch.equal(flow.inverse(x), x)
    y, logdet = flow.forward_and_logdet(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(5))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_nonlinear_flow_is_bijection_with_correct_logdet(method, bijection_checker, perturb):
    net = perturb(MLPVelocity(3, hidden=16, depth=1).double(), 0.3)
    # rk4 round-trip error falls ~16x per halving of h (5e-3 at 8 steps): 128 steps -> ~2e-8
    steps = {"rk4": 128, "dopri5": 2}[method]
    flow = FlowMap(net, steps=steps, method=method, rtol=1e-9, atol=1e-11)
    x = torch.randn(4, 3, dtype=F64)
    y = flow(x)
    assert (y - x).abs().max() > 1e-2  # the map is not trivial
    # discrete forward/inverse agree to solver accuracy; logdet vs slogdet of the Jacobian
    bijection_checker(flow.forward_and_logdet, flow.inverse, x, atol=1e-7, map_fn=flow)


def test_conv_flow_exact_logdet(jac_logdets, perturb):
    net = perturb(ConvVelocity(2, hidden=8, depth=1).double(), 0.2)
    flow = FlowMap(net, steps=16, method="rk4")
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    y, logdet = flow.forward_and_logdet(x)
    torch.testing.assert_close(y, flow(x))
    # the discrete map's Jacobian and the integrated trace agree to the solver's O(h^4)
    # (measured: 7e-3 at 4 steps, 1.4e-3 at 8, 8e-5 at 16, with |logdet| ~ 0.7)
    oracle = jac_logdets(flow, x)
    torch.testing.assert_close(logdet, oracle, atol=5e-4, rtol=0)
    assert logdet.abs().max() > 1e-2


def test_hutchinson_averages_to_exact_trace_linear():
    d, n = 5, 20000
    a = _random_matrix(d)
    flow = FlowMap(LinearVelocity(a), steps=1, method="rk4")
    x = torch.randn(1, d, dtype=F64).expand(n, d)
    with torch.no_grad():
        _, est = flow.forward_and_logdet(x, estimator="hutchinson")
    tr = torch.trace(a).item()
    assert est.std() > 0  # single probes are noisy ...
    assert abs(est.mean().item() - tr) < 5 * est.std().item() / math.sqrt(n)  # ... but unbiased
    # Rademacher probes: variance = 2 * sum_{i != j} A_ij^2 sym. part (closed form)
    sym = 0.5 * (a + a.T)
    var = 2 * (sym**2).sum() - 2 * (torch.diagonal(sym) ** 2).sum()
    assert abs(est.var().item() / var.item() - 1) < 0.1


def test_hutchinson_averages_to_exact_logdet_nonlinear(perturb):
    net = perturb(MLPVelocity(3, hidden=16, depth=1).double(), 0.3)
    flow = FlowMap(net, steps=4, method="rk4")
    n = 4000
    x = torch.randn(1, 3, dtype=F64).expand(n, 3)
    with torch.no_grad():
        y_e, exact = flow.forward_and_logdet(x[:1], estimator="exact")
        gen = torch.Generator().manual_seed(0)
        y_h, est = flow.forward_and_logdet(x, estimator="hutchinson", generator=gen)
    torch.testing.assert_close(y_h, y_e.expand(n, 3))  # the probe does not affect the states
    assert abs(est.mean().item() - exact.item()) < 5 * est.std().item() / math.sqrt(n)


def test_hutchinson_with_given_noise_is_deterministic():
    a = _random_matrix(3)
    flow = FlowMap(LinearVelocity(a), steps=2)
    x = torch.randn(4, 3, dtype=F64)
    noise = torch.randint(0, 2, (4, 3)).to(F64) * 2 - 1
    _, e1 = flow.forward_and_logdet(x, estimator="hutchinson", noise=noise)
    # eps^T A eps is constant in time for a linear field
    torch.testing.assert_close(e1, ((noise @ a.T) * noise).sum(1))
    with pytest.raises(ValueError, match="noise must have shape"):
        flow.forward_and_logdet(x, estimator="hutchinson", noise=noise[:2])


def test_trajectory_and_return_trajectory(perturb):
    net = perturb(MLPVelocity(3, hidden=16, depth=1), 0.3)
    flow = FlowMap(net, steps=5, method="heun")
    x = torch.randn(4, 3)
    traj = flow.trajectory(x)
    assert traj.shape == (6, 4, 3) and torch.equal(traj[0], x)
    y, traj2 = flow(x, return_trajectory=True)
    assert torch.equal(y, traj[-1]) and torch.equal(traj2, traj)
    x_back, back = flow.inverse(y, return_trajectory=True)
    assert back.shape == (6, 4, 3) and torch.equal(back[0], y) and torch.equal(x_back, back[-1])
    torch.testing.assert_close(flow.trajectory(y, reverse=True), back)


def test_conditioning_is_forwarded(perturb):
    net = perturb(MLPVelocity(3, hidden=16, depth=1, cond_dim=2).double(), 0.3)
    flow = FlowMap(net, steps=2, method="dopri5", rtol=1e-10, atol=1e-12)
    x = torch.randn(4, 3, dtype=F64)
    c1, c2 = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    y1, y2 = flow(x, context=c1), flow(x, context=c2)
    assert (y1 - y2).abs().max() > 1e-3
    torch.testing.assert_close(flow.inverse(y1, context=c1), x, atol=1e-7, rtol=0)
    _, ld = flow.forward_and_logdet(x, context=c1)
    assert ld.shape == (4,)
    with pytest.raises(ValueError, match="context"):
        flow(x)


def test_log_prob_gradcheck_wrt_velocity_parameters():
    """Likelihood training: gradients of log_prob w.r.t. the field's parameters."""
    y = torch.randn(3, 2, dtype=F64)
    noise = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=F64)

    def logp(a, estimator):
        flow = FlowMap(LinearVelocity(torch.zeros(2, 2, dtype=F64)), steps=2)
        del flow.velocity.a
        flow.velocity.a = a  # functional use of the parameter tensor
        return flow.log_prob(y, _std_normal_logp, estimator=estimator, noise=noise)

    a = _random_matrix(2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: logp(a, "exact"), (a,))
    assert torch.autograd.gradcheck(lambda a: logp(a, "hutchinson"), (a,))


def test_log_prob_backward_on_network(perturb):
    net = perturb(MLPVelocity(3, hidden=16, depth=1), 0.1)
    flow = FlowMap(net, steps=2)
    y = torch.randn(4, 3)
    loss = -flow.log_prob(y, _std_normal_logp_f32).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.out.weight.grad.abs().sum() > 0


def _std_normal_logp_f32(z):
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)


def test_no_grad_mode():
    a = _random_matrix(3)
    flow = FlowMap(LinearVelocity(a), steps=2)
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        y, ld = flow.forward_and_logdet(x)
        assert not y.requires_grad and not ld.requires_grad


def test_validation():
    net = MLPVelocity(3, hidden=8, depth=1)
    with pytest.raises(ValueError, match="known methods"):
        FlowMap(net, method="rk5")
    with pytest.raises(ValueError, match="steps"):
        FlowMap(net, steps=0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        FlowMap(net, steps=2.5)  # not silently 2
    with pytest.raises(ValueError, match="estimator"):
        FlowMap(net).forward_and_logdet(torch.randn(2, 3), estimator="skilling")
    y, logdet = FlowMap(net).forward_and_logdet(torch.randn(0, 3))  # an empty batch
    assert y.shape == (0, 3) and logdet.shape == (0,)


def test_torchdiffeq_backend_flowmap(perturb):
    pytest.importorskip("torchdiffeq")
    net = perturb(MLPVelocity(3, hidden=16, depth=1).double(), 0.3)
    x = torch.randn(4, 3, dtype=F64)
    ours = FlowMap(net, steps=2, method="dopri5", rtol=1e-9, atol=1e-11)
    ref = FlowMap(
        net, steps=2, method="dopri5", rtol=1e-9, atol=1e-11, options={"backend": "torchdiffeq"}
    )
    torch.testing.assert_close(ours(x), ref(x), atol=1e-7, rtol=0)

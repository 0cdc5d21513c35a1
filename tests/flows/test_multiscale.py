"""Multi-scale normalizing flows (flowdistill.nf): exactness against independent oracles."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flowdistill.errors import ShapeMismatchError
from flowdistill.nf import (
    FlowStep,
    LogitTransform,
    MultiScaleFlow,
    SplitPrior,
    bits_per_dim,
    dequantize,
    final_latent_kd,
    intermediate_latent_kd,
    synthesized_kd,
)
from flowdistill.nf.losses import check_pair

F64 = torch.float64


def _flow(perturb, shape=(1, 4, 4), levels=2, steps=2, hidden=6, scale=0.3, **kw) -> MultiScaleFlow:
    flow = MultiScaleFlow(shape, levels=levels, steps=steps, hidden=hidden, **kw).double()
    flow.encode(torch.rand(32, *shape, dtype=F64))  # ActNorm's data-dependent initialisation
    return perturb(flow, scale)  # zero-initialised couplings and priors move off the identity


def test_logit_transform_bijection(bijection_checker):
    layer = LogitTransform(alpha=0.05)
    y = torch.rand(3, 2, 2, 2, dtype=F64)
    x, logdet = bijection_checker(layer, layer.inverse, y, atol=1e-10)
    p = 0.05 + 0.9 * y
    assert torch.allclose(x, torch.log(p / (1 - p)))


def test_flow_step_bijection(bijection_checker, perturb):
    step = FlowStep(4, hidden=6).double()
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    step(x)  # ActNorm initialises on the first call
    perturb(step, 0.3)
    bijection_checker(step, step.inverse, x, atol=1e-10)


def test_split_prior_starts_standard_normal():
    mean, log_std = SplitPrior(2, 3)(torch.randn(4, 2, 3, 3))
    assert mean.shape == log_std.shape == (4, 3, 3, 3)
    assert not mean.any() and not log_std.any()


@pytest.mark.parametrize("split_prior", [True, False])
@pytest.mark.parametrize("logit", [True, False])
def test_whole_flow_log_prob_against_autograd_jacobian(perturb, split_prior, logit):
    flow = _flow(perturb, split_prior=split_prior, logit=logit)
    y = torch.rand(3, 1, 4, 4, dtype=F64) * 0.9 + 0.05
    out = flow.encode(y)

    def to_noise(v: torch.Tensor) -> torch.Tensor:  # the bijection y -> all eps, flattened
        return torch.cat([e.reshape(1, -1) for e in flow.encode(v).noise], dim=1)

    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v: to_noise(v.reshape(1, 1, 4, 4)).reshape(-1), y[i].reshape(-1)
        )
        eps = to_noise(y[i : i + 1]).reshape(-1)
        expected = (
            -0.5 * (eps**2).sum()
            - 0.5 * eps.numel() * math.log(2 * math.pi)
            + torch.linalg.slogdet(jac).logabsdet
        )
        assert torch.allclose(out.log_prob[i], expected, atol=1e-9), (out.log_prob[i], expected)
    assert torch.allclose(flow.decode(out.noise), y, atol=1e-10)  # round trip


def test_shapes_of_latents_and_levels(perturb):
    flow = _flow(perturb, shape=(2, 8, 8), levels=3, steps=1, hidden=4)
    out = flow.encode(torch.rand(5, 2, 8, 8, dtype=F64))
    assert [tuple(e.shape[1:]) for e in out.noise] == [(4, 4, 4), (8, 2, 2), (32, 1, 1)]
    assert flow.noise_shapes() == [(4, 4, 4), (8, 2, 2), (32, 1, 1)]
    assert [tuple(h.shape[1:]) for h in out.levels] == [(8, 4, 4), (16, 2, 2), (32, 1, 1)]
    assert sum(math.prod(s) for s in flow.noise_shapes()) == flow.dims == 128


def test_fresh_flow_is_a_rotation_so_its_density_is_standard_normal():
    # identity ActNorm (marked initialised), orthogonal 1x1 convolutions, identity couplings
    # and zero priors: log p(y) is the standard normal log density of y
    flow = MultiScaleFlow((1, 4, 4), levels=2, steps=2, hidden=4, logit=False).double()
    for module in flow.modules():
        if hasattr(module, "initialized"):
            module.initialized.fill_(True)
    y = torch.randn(6, 1, 4, 4, dtype=F64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(y).flatten(1).sum(1)
    assert torch.allclose(flow.log_prob(y), expected, atol=1e-10)
    # bits/dim of discrete data: -log2 of the probability mass the density puts on a bin
    bpd = bits_per_dim(flow.log_prob(y), 16, n_bins=4)
    assert torch.allclose(bpd, (-expected + 16 * math.log(4)) / (16 * math.log(2)))


def test_bits_per_dim_of_a_flow_fitted_to_a_known_gaussian():
    # every 2x2 block of a 4x4 image is an independent draw from N(mu, Sigma): one squeeze,
    # ActNorm and an invertible 1x1 convolution can represent exactly its whitening
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=F64)
    sigma = a @ a.T / 4 + 0.1 * torch.eye(4, dtype=F64)
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    gauss = torch.distributions.MultivariateNormal(mu, sigma)

    def draw(n: int) -> torch.Tensor:  # (n, 1, 4, 4) with blocks of the squeeze's layout
        blocks = gauss.sample((n, 2, 2))  # (n, 2, 2, 4): block (i, j), pixel k = 2a + b
        return blocks.reshape(n, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(n, 1, 4, 4)

    entropy = 4 * 0.5 * torch.logdet(2 * math.pi * math.e * sigma)  # per image, nats
    analytic = float(entropy / (16 * math.log(2)))
    flow = MultiScaleFlow((1, 4, 4), levels=1, steps=2, hidden=8, logit=False).double()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        loss = -flow.log_prob(draw(256)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fitted = float(bits_per_dim(flow.log_prob(draw(20000)), 16, None).mean())
    assert abs(fitted - analytic) < 0.01, (fitted, analytic)


def test_sampling_uses_the_temperature(perturb):
    flow = _flow(perturb, scale=0.1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    samples = flow.sample(4, temperature=0.5, generator=g1)
    noise = [0.5 * torch.randn(4, *s, generator=g2, dtype=F64) for s in flow.noise_shapes()]
    assert torch.allclose(samples, flow.decode(noise))
    recovered = flow.encode(samples).noise
    assert all(torch.allclose(r, n, atol=1e-9) for r, n in zip(recovered, noise, strict=True))
    cold = flow.sample(3, temperature=1e-8)  # T -> 0: the mode path, the same every time
    assert torch.allclose(cold, cold[:1].expand_as(cold), atol=1e-6)


def test_dequantize_lies_in_each_bin():
    v = torch.randint(0, 17, (100, 1, 8, 8), dtype=torch.uint8)
    y = dequantize(v, 17)
    assert ((y * 17).floor() == v.float()).all()


def test_invalid_configurations_name_the_problem():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        MultiScaleFlow((1, 28, 28), levels=3)
    with pytest.raises(ValueError, match="steps"):
        MultiScaleFlow((1, 8, 8), levels=2, steps=[2])
    with pytest.raises(ValueError, match="expects images"):
        MultiScaleFlow((1, 8, 8), levels=1).encode(torch.rand(2, 1, 4, 4))


# --------------------------------------------------------------------- distillation losses
def _pair(perturb):
    teacher = _flow(perturb, steps=3, hidden=8, scale=0.1)
    student = copy.deepcopy(teacher)
    return student, teacher


def test_each_loss_is_zero_when_student_equals_teacher(perturb):
    student, teacher = _pair(perturb)
    y = torch.rand(5, 1, 4, 4, dtype=F64)
    s_out, t_out = student.encode(y), teacher.encode(y)
    assert intermediate_latent_kd(s_out, t_out) == 0
    assert final_latent_kd(s_out, t_out) == 0
    for target in ("latent", "sample"):
        value = synthesized_kd(student, teacher, 6, 0.7, target, torch.Generator().manual_seed(0))
        assert value < 1e-18, (target, value)


def test_losses_match_a_direct_computation_for_different_flows(perturb):
    teacher = _flow(perturb, steps=3, hidden=8, scale=0.1)
    student = _flow(perturb, steps=1, hidden=4, scale=0.1)  # fewer steps, matched by level
    check_pair(student, teacher)
    y = torch.rand(5, 1, 4, 4, dtype=F64)
    s_out, t_out = student.encode(y), teacher.encode(y)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    expected = ((flat(s_out.levels) - flat(t_out.levels)) ** 2).mean()
    assert torch.allclose(intermediate_latent_kd(s_out, t_out), expected)
    expected = ((flat(s_out.noise) - flat(t_out.noise)) ** 2).mean()
    assert torch.allclose(final_latent_kd(s_out, t_out), expected)
    assert final_latent_kd(s_out, t_out) > 0
    # gradients reach the student only
    intermediate_latent_kd(s_out, t_out).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    g = torch.Generator().manual_seed(1)
    y_t = teacher.sample(4, 0.7, g).clamp(0, 1)
    eps = teacher.encode(y_t).noise
    g = torch.Generator().manual_seed(1)
    got = synthesized_kd(student, teacher, 4, 0.7, "latent", g)
    assert torch.allclose(got, ((flat(student.encode(y_t).noise) - flat(eps)) ** 2).mean())


def test_pair_mismatch_is_refused(perturb):
    with pytest.raises(ShapeMismatchError, match="levels"):
        check_pair(_flow(perturb, levels=1), _flow(perturb, levels=2))

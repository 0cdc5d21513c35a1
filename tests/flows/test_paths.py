"""Schedulers and affine paths: endpoints, velocities against autodiff / finite differences,
and prediction-type conversions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowdistill.flows import (
    PATHS,
    PREDICTION_TYPES,
    AffinePath,
    StraightPath,
    StraightScheduler,
    VEPath,
    VEScheduler,
    VPPath,
    VPScheduler,
    get_path,
)

F64 = torch.float64

SCHEDULERS = {
    "straight": StraightScheduler(),
    "straight_smin": StraightScheduler(sigma_min=0.1),
    "vp_cosine": VPScheduler("cosine"),
    "vp_linear": VPScheduler("linear"),
    "ve": VEScheduler(sigma_min=0.01, sigma_max=5.0),
}


def _endpoints(shape=(6, 3, 2)):
    return torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)


def test_straight_endpoints_exact():
    x0, x1 = _endpoints()
    path = StraightPath()
    b = x0.shape[0]
    assert torch.equal(path.sample(x0, x1, torch.zeros(b, dtype=F64)).x_t, x0)
    assert torch.equal(path.sample(x0, x1, 1.0).x_t, x1)
    torch.testing.assert_close(path.sample(x0, x1, 0.3).dx_t, x1 - x0)


def test_straight_sigma_min_endpoint():
    x0, x1 = _endpoints()
    s = StraightPath(sigma_min=0.05).sample(x0, x1, 1.0)
    torch.testing.assert_close(s.x_t, x1 + 0.05 * x0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_vp_endpoints_and_variance(schedule):
    sched = VPScheduler(schedule)
    t = torch.linspace(0, 1, 101, dtype=F64)
    c = sched(t)
    torch.testing.assert_close(c.alpha_t**2 + c.sigma_t**2, torch.ones_like(t))
    assert c.alpha_t[0] < 1e-2 and c.sigma_t[0] > 0.9999
    assert c.alpha_t[-1] > 1 - 1e-6 and c.sigma_t[-1] < 2e-3
    # monotone: alpha increases, sigma decreases
    assert (c.alpha_t.diff() > 0).all() and (c.sigma_t.diff() < 0).all()
    x0, x1 = _endpoints()
    path = VPPath(schedule)
    # |x_t - endpoint| <= 1e-2 (|x0| + |x1|) elementwise at both ends
    bound = 1e-2 * (x0.abs() + x1.abs())
    assert ((path.sample(x0, x1, 0.0).x_t - x0).abs() <= bound).all()
    assert ((path.sample(x0, x1, 1.0).x_t - x1).abs() <= bound).all()


def test_vp_linear_closed_form_alpha0():
    c = VPScheduler("linear", beta_min=0.1, beta_max=20.0, eps=1e-5)(torch.zeros((), dtype=F64))
    s = 1.0  # diffusion time at t = 0
    expected = math.exp(-0.5 * s * 0.1 - 0.25 * s**2 * 19.9)
    assert abs(c.alpha_t.item() - expected) < 1e-12


def test_ve_endpoints():
    sched = VEScheduler(sigma_min=0.01, sigma_max=5.0)
    c = sched(torch.tensor([0.0, 1.0], dtype=F64))
    torch.testing.assert_close(c.sigma_t, torch.tensor([5.0, 0.01], dtype=F64))
    torch.testing.assert_close(c.alpha_t, torch.ones(2, dtype=F64))
    x0, x1 = _endpoints()
    path = VEPath(sigma_min=0.01, sigma_max=5.0)
    torch.testing.assert_close(path.sample(x0, x1, 1.0).x_t, x1 + 0.01 * x0)
    torch.testing.assert_close(path.sample(x0, x1, 0.0).x_t, x1 + 5.0 * x0)


# torch.func may call torch.jit.script internally, which warns on recent torch versions
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_velocity_is_time_derivative_jvp(name):
    """dx_t equals d/dt x_t computed by forward-mode autodiff (torch.func.jvp)."""
    path = AffinePath(SCHEDULERS[name])
    x0, x1 = _endpoints()
    t = 0.02 + 0.96 * torch.rand(x0.shape[0], dtype=F64)

    def x_of_t(tt):
        return path.sample(x0, x1, tt).x_t

    _, dxdt = torch.func.jvp(x_of_t, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(path.sample(x0, x1, t).dx_t, dxdt, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_derivatives_finite_differences(name):
    sched = SCHEDULERS[name]
    t = torch.linspace(0.02, 0.98, 25, dtype=F64)
    h = 1e-6
    cp, cm, c = sched(t + h), sched(t - h), sched(t)
    fd_alpha = (cp.alpha_t - cm.alpha_t) / (2 * h)
    fd_sigma = (cp.sigma_t - cm.sigma_t) / (2 * h)
    torch.testing.assert_close(c.d_alpha_t, fd_alpha, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.d_sigma_t, fd_sigma, atol=1e-6, rtol=1e-6)


def test_time_broadcasting_matches_per_sample():
    path = VPPath("cosine")
    x0, x1 = torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 2, 4, 4, dtype=F64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    s = path.sample(x0, x1, t)
    assert s.t.shape == (3,)
    for i in range(3):
        si = path.sample(x0[i : i + 1], x1[i : i + 1], float(t[i]))
        torch.testing.assert_close(s.x_t[i : i + 1], si.x_t)
        torch.testing.assert_close(s.dx_t[i : i + 1], si.dx_t)


def test_bad_time_shape_and_mismatched_endpoints():
    x0, x1 = _endpoints()
    path = StraightPath()
    with pytest.raises(ValueError, match="shape"):
        path.sample(x0, x1, torch.rand(2, 2))
    with pytest.raises(ValueError, match="shape"):
        path.sample(x0, x1, torch.rand(x0.shape[0] + 1))
    with pytest.raises(ValueError, match="equal shapes"):
        path.sample(x0, x1[:, :1], 0.5)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_conversions_recover_known_endpoints(name):
    """Oracle: the endpoints used to build x_t are known exactly."""
    path = AffinePath(SCHEDULERS[name])
    x0, x1 = _endpoints()
    t = 0.05 + 0.9 * torch.rand(x0.shape[0], dtype=F64)
    s = path.sample(x0, x1, t)
    given_values = {"velocity": s.dx_t, "x0": x0, "x1": x1, "noise": x0}
    for src in PREDICTION_TYPES:
        for dst in PREDICTION_TYPES:
            out = path.convert(given_values[src], s.x_t, t, src, dst)
            torch.testing.assert_close(out, given_values[dst], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(path.velocity_to_x1(s.dx_t, s.x_t, t), x1)
    torch.testing.assert_close(path.velocity_to_x0(s.dx_t, s.x_t, t), x0)
    torch.testing.assert_close(path.x1_to_velocity(x1, s.x_t, t), s.dx_t)
    torch.testing.assert_close(path.x0_to_velocity(x0, s.x_t, t), s.dx_t)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(SCHEDULERS)),
    t=st.floats(0.05, 0.95),
    src=st.sampled_from(PREDICTION_TYPES),
    dst=st.sampled_from(PREDICTION_TYPES),
    seed=st.integers(0, 2**16),
)
def test_conversions_round_trip(name, t, src, dst, seed):
    """convert(convert(v, src -> dst), dst -> src) == v for arbitrary (not path-consistent) v."""
    gen = torch.Generator().manual_seed(seed)
    path = AffinePath(SCHEDULERS[name])
    x_t = torch.randn(4, 5, generator=gen, dtype=F64)
    value = torch.randn(4, 5, generator=gen, dtype=F64)
    there = path.convert(value, x_t, t, src, dst)
    back = path.convert(there, x_t, t, dst, src)
    torch.testing.assert_close(back, value, atol=1e-8, rtol=1e-8)


def test_convert_rejects_unknown_type():
    path = StraightPath()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown prediction type"):
        path.convert(x, x, 0.5, "score", "x1")


def test_get_path_registry():
    assert isinstance(get_path("straight"), StraightPath)
    assert isinstance(get_path("rectified", sigma_min=0.1), StraightPath)
    assert isinstance(get_path("VP", schedule="linear"), VPPath)
    assert isinstance(get_path("ve", sigma_max=3.0), VEPath)
    assert set(PATHS) >= {"straight", "vp", "ve"}
    with pytest.raises(ValueError, match="known paths"):
        get_path("nope")


def test_scheduler_argument_validation():
    with pytest.raises(ValueError):
        StraightScheduler(sigma_min=1.0)
    with pytest.raises(ValueError):
        VPScheduler("quadratic")
    with pytest.raises(ValueError):
        VEScheduler(sigma_min=1.0, sigma_max=0.5)


def test_path_preserves_dtype():
    for dtype in (torch.float32, torch.float64):
        x0, x1 = torch.randn(2, 3, dtype=dtype), torch.randn(2, 3, dtype=dtype)
        for name in ("straight", "vp", "ve"):
            s = get_path(name).sample(x0, x1, torch.rand(2))
            assert s.x_t.dtype == dtype and s.dx_t.dtype == dtype and s.t.dtype == dtype

"""Discrete invertible layers: round trips and log|det J| against autograd Jacobians."""

from __future__ import annotations

import pytest
import torch

from flowdistill.flows import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    InvertibleSequence,
    Squeeze,
    squeeze2d,
    unsqueeze2d,
)

F64 = torch.float64


@pytest.mark.parametrize("scale", ["tanh", "sigmoid"])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("kind,shape", [("mlp", (3, 5)), ("conv", (2, 3, 4, 4))])
def test_affine_coupling_bijection(kind, shape, parity, scale, bijection_checker, perturb):
    layer = AffineCoupling(shape[1], hidden=8, kind=kind, parity=parity, scale=scale).double()
    x = torch.randn(*shape, dtype=F64)
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(shape[0], dtype=F64))
    perturb(layer, 0.5)
    y, logdet = bijection_checker(layer, layer.inverse, x, atol=1e-10)
    assert logdet.abs().min() > 1e-3  # not the identity any more
    # the kept half passes through untouched
    k = shape[1] // 2
    kept = slice(0, k) if parity == 0 else slice(k, None)
    assert torch.equal(y[:, kept], x[:, kept])


def test_affine_coupling_tanh_bounds_the_log_scale():
    layer = AffineCoupling(4, hidden=4, scale="tanh", scale_bound=1.5).double()
    with torch.no_grad():
        layer.conditioner[-1].bias.fill_(100.0)  # huge raw scale
    x = torch.randn(2, 4, dtype=F64)
    _, logdet = layer(x)
    torch.testing.assert_close(logdet, torch.full((2,), 2 * 1.5, dtype=F64))


def test_actnorm_data_dependent_init_then_bijection(bijection_checker):
    layer = ActNorm(3).double()
    x = 5.0 + 3.0 * torch.randn(16, 3, 4, 4, dtype=F64)
    y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=F64))
    std = y.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(std, torch.ones(3, dtype=F64), atol=1e-6, rtol=0)  # eps=1e-6
    loc = layer.loc.detach().clone()
    layer(torch.randn(4, 3, 4, 4, dtype=F64))  # later batches do not re-initialise
    assert torch.equal(layer.loc, loc)
    bijection_checker(layer, layer.inverse, torch.randn(2, 3, 2, 2, dtype=F64), atol=1e-10)


def test_actnorm_init_survives_a_state_dict_round_trip():
    a = ActNorm(2)
    a(torch.randn(8, 2) * 4)
    b = ActNorm(2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2)
    assert bool(b.initialized) and torch.equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 3, 3)])
def test_invconv_bijection_and_weight(shape, bijection_checker, perturb):
    layer = InvConv1x1(4).double()
    w = layer.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=F64), atol=1e-6, rtol=0)  # float32 init
    perturb(layer, 0.3)
    w = layer.weight()
    torch.testing.assert_close(layer.inverse_weight() @ w, torch.eye(4, dtype=F64))
    x = torch.randn(*shape, dtype=F64)
    y, logdet = bijection_checker(layer, layer.inverse, x, atol=1e-10)
    positions = 1 if len(shape) == 2 else shape[2] * shape[3]
    expected = torch.linalg.slogdet(w).logabsdet * positions
    torch.testing.assert_close(logdet, expected.expand(shape[0]))
    torch.testing.assert_close(y, torch.einsum("ij,bj...->bi...", w, x))


def test_squeeze_layout_and_inverse(bijection_checker):
    x = torch.arange(2 * 3 * 4 * 6, dtype=F64).reshape(2, 3, 4, 6)
    y = squeeze2d(x)
    assert y.shape == (2, 12, 2, 3)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[:, c * 4 + i * 2 + j], x[:, c, i::2, j::2])
    assert torch.equal(unsqueeze2d(y), x)
    bijection_checker(Squeeze(), Squeeze().inverse, torch.randn(1, 2, 4, 4, dtype=F64), atol=0)
    with pytest.raises(ValueError, match="divisible"):
        squeeze2d(torch.randn(1, 1, 3, 4))


def test_sequence_composes_and_sums_logdets(bijection_checker, perturb):
    seq = InvertibleSequence(
        ActNorm(2),
        InvConv1x1(2),
        AffineCoupling(2, hidden=8, kind="conv"),
        Squeeze(),
        AffineCoupling(8, hidden=8, kind="conv", parity=1),
    ).double()
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    seq(x)  # ActNorm data-dependent initialisation
    perturb(seq, 0.2)
    y, logdet = bijection_checker(seq, seq.inverse, x, atol=1e-9)
    assert y.shape == (3, 8, 2, 2) and len(seq) == 5
    total, h = torch.zeros(3, dtype=F64), x
    for layer in seq:
        h, ld = layer(h)
        total = total + ld
    torch.testing.assert_close(logdet, total)


def test_layers_reject_wrong_shapes():
    with pytest.raises(ValueError, match="expects"):
        AffineCoupling(4, kind="conv")(torch.randn(2, 4))
    with pytest.raises(ValueError, match="expects"):
        AffineCoupling(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(B, 3"):
        ActNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(B, 3"):
        InvConv1x1(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="scale"):
        AffineCoupling(4, scale="exp")

"""Velocity networks and time / context embeddings."""

from __future__ import annotations

import pytest
import torch

from flowdistill.flows import (
    ConditionEmbedding,
    ConvVelocity,
    FiLM,
    MLPVelocity,
    TimeEmbedding,
    TokenVelocity,
)

F64 = torch.float64


def _make(kind: str, cond_dim: int | None = None):
    if kind == "mlp":
        return MLPVelocity(5, hidden=32, depth=2, cond_dim=cond_dim), (4, 5)
    if kind == "conv":
        return ConvVelocity(3, hidden=16, cond_dim=cond_dim, depth=1), (4, 3, 6, 6)
    return TokenVelocity(6, hidden=16, depth=1, heads=2, cond_dim=cond_dim), (4, 7, 6)


def _perturb_last(net: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight, std=0.3)
        torch.nn.init.normal_(net.out.bias, std=0.3)


KINDS = ["mlp", "conv", "token"]


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_net_outputs_exact_zero_with_input_shape(kind):
    net, shape = _make(kind, cond_dim=3)
    x = torch.randn(*shape)
    out = net(x, torch.rand(shape[0]), context=torch.randn(shape[0], 3))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("kind", KINDS)
def test_time_forms_agree(kind):
    net, shape = _make(kind)
    _perturb_last(net)
    x = torch.randn(*shape)
    ref = net(x, torch.full((shape[0],), 0.25))
    assert not torch.equal(ref, torch.zeros_like(ref))
    for t in (0.25, torch.tensor(0.25), torch.tensor([0.25])):
        torch.testing.assert_close(net(x, t), ref)
    # and time actually matters
    assert not torch.allclose(net(x, 0.75), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_conditioning_changes_output_once_last_layer_perturbed(kind):
    net, shape = _make(kind, cond_dim=3)
    x, t = torch.randn(*shape), torch.rand(shape[0])
    c1 = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    c2 = torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 1]), 3).float()
    assert torch.equal(net(x, t, context=c1), net(x, t, context=c2))  # both zero
    _perturb_last(net)
    out1, out2 = net(x, t, context=c1), net(x, t, context=c2)
    assert (out1 - out2).abs().max() > 1e-4
    # integer one-hot contexts are accepted and cast
    torch.testing.assert_close(net(x, t, context=c1.long()), out1)


@pytest.mark.parametrize("kind", KINDS)
def test_float64(kind):
    net, shape = _make(kind, cond_dim=2)
    net = net.double()
    _perturb_last(net)
    x = torch.randn(*shape, dtype=F64)
    out = net(x, 0.5, context=torch.randn(shape[0], 2, dtype=F64))
    assert out.dtype == F64 and out.shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
def test_samples_do_not_interact(kind):
    """Per-sample outputs must not depend on the rest of the batch (needed for logdets)."""
    net, shape = _make(kind, cond_dim=2)
    _perturb_last(net)
    x, t, c = torch.randn(*shape), torch.rand(shape[0]), torch.randn(shape[0], 2)
    full = net(x, t, context=c)
    for i in range(shape[0]):
        part = net(x[i : i + 1], t[i : i + 1], context=c[i : i + 1])
        torch.testing.assert_close(part, full[i : i + 1], atol=1e-5, rtol=1e-5)


def test_token_velocity_is_permutation_equivariant():
    net, shape = _make("token")
    _perturb_last(net)
    x = torch.randn(*shape)
    perm = torch.randperm(shape[1])
    torch.testing.assert_close(net(x[:, perm], 0.3), net(x, 0.3)[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_context_validation(kind):
    net, shape = _make(kind, cond_dim=3)
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match="context"):
        net(x, 0.5)
    with pytest.raises(ValueError, match="context"):
        net(x, 0.5, context=torch.randn(shape[0], 4))
    plain, _ = _make(kind)
    with pytest.raises(ValueError, match="cond_dim=None"):
        plain(x, 0.5, context=torch.randn(shape[0], 3))


@pytest.mark.parametrize("kind", KINDS)
def test_input_shape_validation(kind):
    net, shape = _make(kind)
    with pytest.raises(ValueError, match="expected x"):
        net(torch.randn(2, 9), 0.5)
    with pytest.raises(ValueError, match="t must"):
        net(torch.randn(*shape), torch.rand(shape[0] + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_all_parameters(kind):
    net, shape = _make(kind, cond_dim=2)
    _perturb_last(net)
    x = torch.randn(*shape)
    net(x, torch.rand(shape[0]), context=torch.randn(shape[0], 2)).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_time_embedding_values():
    emb = TimeEmbedding(8, scale=1.0, max_period=10.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    out = emb(t)
    assert out.shape == (3, 8) and out.dtype == F64
    freqs = 10.0 ** (-torch.arange(4, dtype=F64) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    torch.testing.assert_close(out, expected)
    assert emb(0.5).shape == (1, 8)
    torch.testing.assert_close(emb(torch.tensor(0.5, dtype=F64)), out[1:2])
    odd = TimeEmbedding(7)(torch.rand(5))
    assert odd.shape == (5, 7) and torch.equal(odd[:, -1], torch.zeros(5))
    assert TimeEmbedding(8)(torch.rand(3).half()).dtype == torch.float16
    with pytest.raises(ValueError):
        TimeEmbedding(8)(torch.rand(2, 2))


def test_time_embedding_distinguishes_nearby_times():
    emb = TimeEmbedding(64)
    out = emb(torch.linspace(0, 1, 101))
    dists = torch.cdist(out, out) + torch.eye(101) * 1e3
    assert dists.min() > 1e-2


def test_film_and_condition_embedding_shapes():
    film = FiLM(4, 3, channel_axis=1)
    h, e = torch.randn(2, 3, 5, 5), torch.randn(2, 4)
    with torch.no_grad():
        film.proj.weight.zero_()
        film.proj.bias.copy_(torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(film(h, e), 2 * h + 0.5)  # (1 + gamma) h + beta
    ce = ConditionEmbedding(16, cond_dim=3)
    x = torch.randn(5, 2)
    assert ce(0.2, x, context=torch.randn(5, 3)).shape == (5, 16)

"""Shared fixtures for the flows tests: seeding and a reusable bijection checker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def perturb_(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Add Gaussian noise to every parameter (moves zero-initialised layers off identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def jacobian_logdets(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """log|det J| of ``fn`` per sample, from the full autograd Jacobian (oracle), shape (B,)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def flat(z: Tensor, shape=xi.shape) -> Tensor:
            return fn(z.reshape(shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, xi.reshape(-1))  # (D, D)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def check_bijection(
    forward: Callable[[Tensor], tuple[Tensor, Tensor]],
    inverse: Callable[[Tensor], Tensor],
    x: Tensor,
    atol: float = 1e-9,
    logdet_atol: float | None = None,
    map_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Check a bijection ``forward(x) -> (y, logdet)``, ``inverse(y) -> x``.

    Asserts (against independent oracles): ``inverse(forward(x)) == x``,
    ``forward(inverse(y)) == y``, ``logdet`` has shape ``(B,)`` and equals
    ``slogdet`` of the autograd Jacobian of ``x -> forward(x)[0]`` for every sample.
    ``map_fn`` (default ``x -> forward(x)[0]``) is the map whose Jacobian is the oracle;
    pass a cheaper callable computing the same map when ``forward`` is costly to differentiate.
    Returns ``(y, logdet)``.
    """
    logdet_atol = atol if logdet_atol is None else logdet_atol
    y, logdet = forward(x)
    assert logdet.shape == (x.shape[0],), logdet.shape
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    x_rec = inverse(y)
    assert x_rec.shape == x.shape
    torch.testing.assert_close(x_rec, x, atol=atol, rtol=0)
    y_rec, _ = forward(x_rec)
    torch.testing.assert_close(y_rec, y, atol=atol, rtol=atol)
    if map_fn is None:

        def map_fn(z: Tensor) -> Tensor:
            return forward(z)[0]

    torch.testing.assert_close(map_fn(x), y, atol=atol, rtol=0)
    oracle = jacobian_logdets(map_fn, x)
    torch.testing.assert_close(logdet, oracle.to(logdet.dtype), atol=logdet_atol, rtol=0)
    return y, logdet


@pytest.fixture
def bijection_checker() -> Callable[..., tuple[Tensor, Tensor]]:
    """The :func:`check_bijection` helper as a fixture (works under any pytest import mode)."""
    return check_bijection


@pytest.fixture
def perturb() -> Callable[..., torch.nn.Module]:
    return perturb_


@pytest.fixture
def jac_logdets() -> Callable[..., Tensor]:
    return jacobian_logdets

"""Feature losses: pinned values against independent NumPy formulas, and the invariances
their papers state (float64 throughout)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flowdistill import losses
from flowdistill.errors import ShapeMismatchError
from flowdistill.losses.feature import as_map, map_shape

TOL = {"rtol": 0, "atol": 1e-6}


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(rand(d, d, seed=seed))
    return q


def close(a, b, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(float(a), float(b), rtol=0, atol=atol)


# ---------------------------------------------------------------------------- references
def np_block_mean(x: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling of (B, C, H, W) to size × size when H, W divide evenly."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def np_huber(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1.0, 0.5 * x * x, a - 0.5)


def np_attention(f: np.ndarray, p: float) -> np.ndarray:
    b = f.shape[0]
    q = np.zeros((b, f.shape[2] * f.shape[3]))
    for i in range(b):
        energy = np.zeros(f.shape[2:])
        for c in range(f.shape[1]):
            energy += np.abs(f[i, c]) ** p
        v = (energy / f.shape[1]).reshape(-1)
        q[i] = v / np.sqrt((v * v).sum())
    return q


def np_rkd(s: np.ndarray, t: np.ndarray, wd: float, wa: float) -> float:
    b = s.shape[0]

    def dist(e):
        d = np.zeros((b, b))
        for i, j in itertools.product(range(b), repeat=2):
            if i != j:
                d[i, j] = np.sqrt(((e[i] - e[j]) ** 2).sum())
        return d / (d.sum() / (b * (b - 1)))

    def angles(e):
        out = np.zeros((b, b, b))
        for i, j, k in itertools.product(range(b), repeat=3):
            u, v = e[j] - e[i], e[k] - e[i]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            if nu > 0 and nv > 0:
                out[i, j, k] = u @ v / (nu * nv)
        return out

    loss_d = np_huber(dist(s) - dist(t)).mean()
    loss_a = np_huber(angles(s) - angles(t)).mean()
    return wd * loss_d + wa * loss_a


# ---------------------------------------------------------------------------- pinned values
def test_hint_pinned():
    s, t = rand(3, 4, 5, 5, seed=1), rand(3, 4, 5, 5, seed=2)
    ref = ((s.numpy() - t.numpy()) ** 2).mean()
    close(losses.hint(s, t), ref)
    with pytest.raises(ShapeMismatchError, match="regressor"):
        losses.hint(s, t[:, :2])


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_pinned_with_pooling_and_channel_mismatch(p):
    s, t = rand(3, 5, 8, 8, seed=3), rand(3, 7, 4, 4, seed=4)
    ref_s = np_attention(np_block_mean(s.numpy(), 4), p)  # student pooled to the teacher's 4x4
    ref = ((ref_s - np_attention(t.numpy(), p)) ** 2).mean()
    close(losses.at(s, t, p=p), ref)


def test_at_on_tokens_and_vectors():
    tokens_s, tokens_t = rand(2, 17, 6, seed=5), rand(2, 17, 9, seed=6)  # class token + 4x4
    grid = lambda x: x[:, 1:].numpy().transpose(0, 2, 1).reshape(2, -1, 4, 4)  # noqa: E731
    ref = ((np_attention(grid(tokens_s), 2) - np_attention(grid(tokens_t), 2)) ** 2).mean()
    close(losses.at(tokens_s, tokens_t), ref)
    with pytest.raises(ShapeMismatchError, match="not vectors"):
        losses.at(rand(2, 8), rand(2, 8))


def test_sp_pinned():
    s, t = rand(4, 3, 2, 2, seed=7), rand(4, 5, seed=8)
    fs, ft = s.numpy().reshape(4, -1), t.numpy()
    b = fs.shape[0]
    gs, gt = np.zeros((b, b)), np.zeros((b, b))
    for i, j in itertools.product(range(b), repeat=2):
        gs[i, j], gt[i, j] = fs[i] @ fs[j], ft[i] @ ft[j]
    gs /= np.linalg.norm(gs, axis=1, keepdims=True)
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    close(losses.sp(s, t), ((gt - gs) ** 2).sum() / b**2)


def test_rkd_angles_with_equal_embeddings_and_their_gradient():
    from flowdistill.losses.feature import _angles

    # two equal rows (a vanishing difference, whose angles count as 0) and a far offset,
    # against the loop oracle
    s, t = rand(6, 40, seed=3) + 50.0, rand(6, 7, seed=4)
    s[2] = s[0]
    t[5] = t[1]
    close(losses.rkd(s, t, 0.0, 1.0), np_rkd(s.numpy(), t.numpy(), 0.0, 1.0))

    # the gradient against finite differences (float64)
    weights = torch.randn(6, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = rand(6, 5, seed=5).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: (_angles(e).view(6, 6, 6) * weights).sum(), (x,))
    # where two embeddings coincide the gradient stays finite and of ordinary size
    x = s.double().requires_grad_(True)
    (_angles(x).view(6, 6, 6) * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e3


def test_rkd_pinned():
    s, t = rand(5, 3, seed=9), rand(5, 6, seed=10)
    close(losses.rkd(s, t), np_rkd(s.numpy(), t.numpy(), 25.0, 50.0))
    close(losses.rkd(s, t, 1.0, 0.0), np_rkd(s.numpy(), t.numpy(), 1.0, 0.0))
    close(losses.rkd(s, t, 0.0, 1.0), np_rkd(s.numpy(), t.numpy(), 0.0, 1.0))


def test_pkt_pinned():
    s, t = rand(4, 6, seed=11), rand(4, 2, 3, seed=12)
    eps = 1e-7

    def cond(x):
        x = x.reshape(x.shape[0], -1)
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = np.array([[(1 + x[i] @ x[j]) / 2 for j in range(len(x))] for i in range(len(x))])
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(s.numpy()), cond(t.numpy())
    close(losses.pkt(s, t), (pt * np.log((pt + eps) / (ps + eps))).mean())


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (3, 4), (3, 5, 4)])
def test_vid_pinned(shape):
    mu, t = rand(*shape, seed=13), rand(*shape, seed=14)
    channels = shape[1] if len(shape) == 4 else shape[-1]
    alpha = rand(channels, seed=15)
    var = np.log1p(np.exp(alpha.numpy())) + 1e-5
    var_b = var.reshape(1, -1, 1, 1) if len(shape) == 4 else var
    ref = (0.5 * ((mu.numpy() - t.numpy()) ** 2 / var_b + np.log(var_b))).mean()
    close(losses.vid(mu, t, alpha), ref)
    with pytest.raises(ShapeMismatchError, match="log_scale"):
        losses.vid(mu, t, alpha[:-1])


def test_crd_nce_and_normalizer_pinned():
    b, k, d, n, tau = 3, 5, 4, 50, 0.07
    a = torch.nn.functional.normalize(rand(b, d, seed=16), dim=1)
    keys = torch.nn.functional.normalize(rand(b, k + 1, d, seed=17), dim=2)
    an, kn = a.numpy(), keys.numpy()
    scores = np.array([[np.exp(kn[i, j] @ an[i] / tau) for j in range(k + 1)] for i in range(b)])
    z = scores.mean() * n
    close(losses.crd_normalizer(a, keys, n, tau), z, atol=1e-6 * z)
    z_fixed = 123.0
    p = scores / z_fixed
    noise = k / n
    ref = 0.0
    for i in range(b):
        ref += np.log(p[i, 0] / (p[i, 0] + noise + 1e-7))
        ref += sum(np.log(noise / (p[i, j] + noise + 1e-7)) for j in range(1, k + 1))
    close(losses.crd_nce(a, keys, n, tau, normalizer=z_fixed), -ref / b)


def test_info_nce_pinned():
    s = torch.nn.functional.normalize(rand(4, 3, seed=18), dim=1)
    t = torch.nn.functional.normalize(rand(4, 3, seed=19), dim=1)
    logits = s.numpy() @ t.numpy().T / 0.07

    def ce(m):
        return np.mean([np.log(np.exp(m[i]).sum()) - m[i, i] for i in range(len(m))])

    close(losses.info_nce(s, t), ce(logits) + ce(logits.T))


def test_hcl_pinned():
    pairs = [
        (rand(2, 3, 8, 8, seed=20), rand(2, 3, 8, 8, seed=21)),  # levels 4, 2, 1
        (rand(2, 3, 4, 4, seed=22), rand(2, 3, 4, 4, seed=23)),  # levels 2, 1
        (rand(2, 5, seed=24), rand(2, 5, seed=25)),  # a vector: plain MSE
    ]
    ref = 0.0
    for s, t in pairs:
        sm, tm = s.numpy(), t.numpy()
        if sm.ndim == 2:
            sm, tm = sm[:, :, None, None], tm[:, :, None, None]
        loss, weight, norm = ((sm - tm) ** 2).mean(), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= sm.shape[2]:
                continue
            weight /= 2
            loss += weight * ((np_block_mean(sm, level) - np_block_mean(tm, level)) ** 2).mean()
            norm += weight
        ref += loss / norm
    close(losses.hcl([s for s, _ in pairs], [t for _, t in pairs]), ref)


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 3), (2, 6, 3)])
def test_pkd_pinned(shape):
    s, t = rand(*shape, seed=26), rand(*shape, seed=27)

    def norm(x):
        ch = 1 if x.ndim == 4 else x.ndim - 1
        x = np.moveaxis(x, ch, 0)
        flat = x.reshape(x.shape[0], -1)
        out = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, ddof=1, keepdims=True) + 1e-6)
        return np.moveaxis(out.reshape(x.shape), 0, ch)

    ref = ((norm(s.numpy()) - norm(t.numpy())) ** 2).mean() / 2
    close(losses.pkd(s, t), ref)


# ---------------------------------------------------------------------------- invariances
def test_pkd_invariant_to_positive_affine_change_per_channel():
    s, t = rand(6, 4, 3, 3, seed=30), rand(6, 4, 3, 3, seed=31)
    scale = rand(4, seed=32).abs() + 0.5
    shift = rand(4, seed=33) * 3
    affine = lambda x: x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)  # noqa: E731
    base = losses.pkd(s, t, eps=0.0)
    torch.testing.assert_close(losses.pkd(affine(s), t, eps=0.0), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses.pkd(s, affine(t), eps=0.0), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        losses.pkd(affine(s), affine(t)), losses.pkd(s, t), rtol=1e-5, atol=0
    )
    tokens = rand(3, 5, 4, seed=34)  # channels last for tokens
    torch.testing.assert_close(
        losses.pkd(tokens * scale + shift, tokens, eps=0.0),
        torch.zeros((), dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_rkd_invariant_to_rotation_translation_and_scaling():
    s, t = rand(6, 5, seed=35), rand(6, 3, seed=36)
    q, shift = orthogonal(5, seed=37), rand(5, seed=38)
    for wd, wa in ((25.0, 0.0), (0.0, 50.0), (25.0, 50.0)):
        base = losses.rkd(s, t, wd, wa)
        torch.testing.assert_close(losses.rkd(s @ q + shift, t, wd, wa), base, **TOL)
        torch.testing.assert_close(losses.rkd(s * 3.7, t, wd, wa), base, **TOL)
        qt = orthogonal(3, seed=39)
        torch.testing.assert_close(losses.rkd(s, 0.2 * (t @ qt) - 1.0, wd, wa), base, **TOL)
    assert losses.rkd(s, s) < 1e-12  # identical relations


def test_sp_invariant_to_scaling_and_orthogonal_maps():
    s, t = rand(5, 6, seed=40), rand(5, 2, 2, 2, seed=41)
    base = losses.sp(s, t)
    torch.testing.assert_close(losses.sp(s * 0.01, t * 40.0), base, **TOL)
    torch.testing.assert_close(losses.sp(s @ orthogonal(6, seed=42), t), base, **TOL)
    assert losses.sp(s, s * 2) < 1e-12


def test_at_invariant_to_positive_scaling():
    s, t = rand(3, 4, 4, 4, seed=43), rand(3, 6, 4, 4, seed=44)
    base = losses.at(s, t)
    torch.testing.assert_close(losses.at(s * 25.0, t * 0.3), base, **TOL)
    assert losses.at(s, 7.0 * s) < 1e-12


def test_pkt_invariant_to_positive_scaling():
    s, t = rand(5, 6, seed=45), rand(5, 4, seed=46)
    base = losses.pkt(s, t)
    torch.testing.assert_close(losses.pkt(s * 9.0, t * 0.5), base, rtol=1e-6, atol=0)
    assert losses.pkt(s, s * 3.0) < 1e-9


def test_crd_nce_is_lower_when_the_positive_matches_the_anchor():
    b, k, d, n = 4, 16, 8, 100
    anchor = torch.nn.functional.normalize(rand(b, d, seed=47), dim=1)
    keys = torch.nn.functional.normalize(rand(b, k + 1, d, seed=48), dim=2)
    z = losses.crd_normalizer(anchor, keys, n)
    random_positive = losses.crd_nce(anchor, keys, n, normalizer=z)
    matched = keys.clone()
    matched[:, 0] = anchor  # the student embedding equals the teacher's
    assert losses.crd_nce(anchor, matched, n, normalizer=z) < random_positive
    # in-batch: matching embeddings give a lower loss than unrelated ones
    other = torch.nn.functional.normalize(rand(b, d, seed=49), dim=1)
    assert losses.info_nce(anchor, anchor) < losses.info_nce(anchor, other)


@pytest.mark.parametrize("k", [3, 40])  # few negatives: rows gathered; many: whole-bank scores
def test_crd_nce_bank_equals_crd_nce_on_gathered_keys(k):
    b, d, n = 6, 8, 30
    memory = torch.nn.functional.normalize(rand(n, d, seed=50), dim=1)
    index = torch.randint(0, n, (b, k + 1), generator=torch.Generator().manual_seed(51))
    anchor = torch.nn.functional.normalize(rand(b, d, seed=52), dim=1).requires_grad_()
    z = losses.crd_normalizer(anchor, memory[index], n)
    loss_bank = losses.crd_nce_bank(anchor, memory, index, n, normalizer=z)
    (grad_bank,) = torch.autograd.grad(loss_bank, anchor)
    loss_keys = losses.crd_nce(anchor, memory[index], n, normalizer=z)
    (grad_keys,) = torch.autograd.grad(loss_keys, anchor)
    torch.testing.assert_close(loss_bank, loss_keys, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_bank, grad_keys, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- helpers, errors
def test_map_views():
    assert map_shape((16,)) == (16, 1, 1)
    assert map_shape((17, 8)) == (8, 4, 4) and map_shape((16, 8)) == (8, 4, 4)
    assert map_shape((5, 8)) == (8, 2, 2) and map_shape((6, 8)) == (8, 6, 1)
    x = rand(2, 17, 8)
    assert as_map(x).shape == (2, 8, 4, 4)
    torch.testing.assert_close(as_map(x)[:, :, 0, 1], x[:, 2])
    assert as_map(rand(2, 6, 8)).shape == (2, 8, 6, 1)
    assert as_map(rand(2, 3)).shape == (2, 3, 1, 1)


def test_batch_mismatch_is_reported():
    for fn in (losses.sp, losses.rkd, losses.pkt):
        with pytest.raises(ShapeMismatchError, match="same size"):
            fn(rand(3, 4), rand(4, 4))
    with pytest.raises(ShapeMismatchError, match="shape"):
        losses.pkd(rand(3, 4), rand(3, 5))
    with pytest.raises(ShapeMismatchError, match="one teacher feature per student"):
        losses.hcl([rand(2, 3)], [])


def test_losses_are_exported():
    for name in ("at", "sp", "rkd", "pkt", "vid", "hint", "hcl", "pkd", "crd_nce", "info_nce"):
        assert name in losses.__all__ and callable(getattr(losses, name))


def test_pkd_has_a_finite_gradient_for_a_constant_channel():
    """A channel constant over the batch (a ReLU unit that never fires) has variance 0: the
    loss and its gradient stay finite, masked or not."""
    torch.manual_seed(0)
    s = torch.randn(8, 4)
    s[:, 0] = 0.0
    s.requires_grad_(True)
    losses.pkd(s, torch.randn(8, 4)).backward()
    assert torch.isfinite(s.grad).all()
    tokens = torch.randn(2, 3, 4)
    tokens[..., 1] = 1.0
    tokens.requires_grad_(True)
    losses.pkd(tokens, torch.randn(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool)).backward()
    assert torch.isfinite(tokens.grad).all()

"""Logit losses (KD, DKD, DIST, LS, TAID) and logit-space losses (ND, OFA): pinned values
against independent NumPy formulas written with explicit loops, and the properties their
papers state (float64 throughout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowdistill import losses
from flowdistill.errors import ShapeMismatchError

TOL = {"rtol": 0, "atol": 1e-6}


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def labels(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


def close(a, b, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(float(a), float(b), rtol=0, atol=atol)


# ---------------------------------------------------------------------------- references
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)) if p[i] > 0))


def np_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    rows = [np_kl(np_softmax(t[n] / temp), np_softmax(s[n] / temp)) for n in range(len(s))]
    return temp**2 * float(np.mean(rows))


def np_dkd_parts(s: np.ndarray, t: np.ndarray, y: int, temp: float) -> tuple[float, float]:
    """(TCKD, NCKD) of one sample, from the paper's definitions."""
    p_s, p_t = np_softmax(s / temp), np_softmax(t / temp)
    b_s = np.array([p_s[y], 1.0 - p_s[y]])
    b_t = np.array([p_t[y], 1.0 - p_t[y]])
    others = [i for i in range(len(s)) if i != y]
    hat_s = np.array([p_s[i] for i in others]) / (1.0 - p_s[y])
    hat_t = np.array([p_t[i] for i in others]) / (1.0 - p_t[y])
    return np_kl(b_t, b_s), np_kl(hat_t, hat_s)


def np_pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    a, b = a - a.mean(), b - b.mean()
    num = sum(a[i] * b[i] for i in range(len(a)))
    return num / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + eps)


def np_dist(s, t, beta, gamma, temp) -> float:
    y_s = np.stack([np_softmax(r / temp) for r in s])
    y_t = np.stack([np_softmax(r / temp) for r in t])
    inter = 1 - np.mean([np_pearson(y_s[n], y_t[n]) for n in range(len(s))])
    intra = 1 - np.mean([np_pearson(y_s[:, c], y_t[:, c]) for c in range(s.shape[1])])
    return temp**2 * (beta * inter + gamma * intra)


def np_zscore(z: np.ndarray) -> np.ndarray:
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - 1))
    return (z - mean) / (std + 1e-7)


def np_taid(s, t, mix) -> float:
    rows = []
    for n in range(len(s)):
        target = np_softmax((1 - mix) * s[n] + mix * t[n])
        rows.append(np_kl(target, np_softmax(s[n])))
    return float(np.mean(rows))


def np_nd(s, t, means, y) -> float:
    total = 0.0
    for i in range(len(s)):
        c = means[y[i]]
        e = c / math.sqrt((c * c).sum())
        total += 1 - float((s[i] * e).sum()) / max(np.linalg.norm(s[i]), np.linalg.norm(t[i]))
    return total / len(s)


def np_ofa(s, t, y, eps, temp) -> float:
    rows = []
    for n in range(len(s)):
        p_t, q = np_softmax(t[n] / temp), np_softmax(s[n] / temp)
        row = 0.0
        for c in range(len(q)):
            one = 1.0 if c == y[n] else 0.0
            row -= ((p_t[c] + one) ** eps - one) * math.log(q[c])
        rows.append(row)
    return float(np.mean(rows))


# ---------------------------------------------------------------------------- KD
def test_kd_is_the_t2_scaled_kl_of_softened_outputs():
    s, t = rand(6, 7, seed=1, scale=2), rand(6, 7, seed=2, scale=2)
    for temp in (1.0, 2.0, 4.0):
        close(losses.kd(s, t, temp), np_kd(s.numpy(), t.numpy(), temp))
        close(losses.kd(s, t, temp), temp**2 * losses.kd(s / temp, t / temp, 1.0))


# ---------------------------------------------------------------------------- DKD
def test_dkd_pinned_value():
    s, t, y = rand(6, 5, seed=3, scale=2), rand(6, 5, seed=4, scale=3), labels(6, 5, seed=5)
    for alpha, beta, temp in ((1.0, 8.0, 4.0), (0.5, 2.0, 2.0)):
        parts = [np_dkd_parts(s[n].numpy(), t[n].numpy(), int(y[n]), temp) for n in range(6)]
        expected = temp**2 * np.mean([alpha * a + beta * b for a, b in parts])
        close(losses.dkd(s, t, y, alpha=alpha, beta=beta, temperature=temp), expected)
    close(
        losses.dkd(s, t, y),
        16.0
        * np.mean(
            [
                a + 8.0 * b
                for a, b in [
                    np_dkd_parts(s[n].numpy(), t[n].numpy(), int(y[n]), 4.0) for n in range(6)
                ]
            ]
        ),
    )  # the authors' defaults


def test_dkd_decomposes_kd_on_every_sample():
    """Zhao et al., Eq. 1: KD = TCKD + (1 - p^T_t) NCKD, with p^T_t the *teacher's*
    softened probability of the target class."""
    temp = 4.0
    s, t, y = rand(8, 6, seed=6, scale=3), rand(8, 6, seed=7, scale=3), labels(8, 6, seed=8)
    for n in range(8):
        sn, tn, yn = s[n : n + 1], t[n : n + 1], y[n : n + 1]
        kd = losses.kd(sn, tn, temp) / temp**2
        tckd = losses.dkd(sn, tn, yn, alpha=1.0, beta=0.0, temperature=temp) / temp**2
        nckd = losses.dkd(sn, tn, yn, alpha=0.0, beta=1.0, temperature=temp) / temp**2
        p_target_teacher = torch.softmax(tn / temp, dim=-1)[0, yn[0]]
        close(kd, tckd + (1 - p_target_teacher) * nckd, atol=1e-12)


def test_dkd_takes_sequences_and_checks_targets():
    s, t, y = rand(2, 3, 5, seed=9), rand(2, 3, 5, seed=10), labels(6, 5, seed=11)
    flat = losses.dkd(s.reshape(6, 5), t.reshape(6, 5), y)
    close(losses.dkd(s, t, y.reshape(2, 3)), flat, atol=1e-12)
    with pytest.raises(ShapeMismatchError, match="one class index per position"):
        losses.dkd(s, t, y)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        losses.dkd(s, t, torch.full((2, 3), 5))
    with pytest.raises(ShapeMismatchError, match="at least 2 classes"):
        losses.dkd(rand(3, 1), rand(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match="differ in shape"):
        losses.dkd(rand(3, 4), rand(3, 5), torch.zeros(3, dtype=torch.long))


def test_dkd_is_stable_for_a_confident_teacher():
    s = rand(4, 5, seed=12)
    t = torch.zeros(4, 5, dtype=torch.float64)
    t[:, 0] = 500.0  # the teacher's target probability rounds to 1
    y = torch.zeros(4, dtype=torch.long)
    value = losses.dkd(s.requires_grad_(), t, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------- DIST
def test_dist_pinned_value():
    s, t = rand(7, 6, seed=13, scale=2), rand(7, 6, seed=14, scale=2)
    close(losses.dist(s, t), np_dist(s.numpy(), t.numpy(), 1.0, 1.0, 1.0))
    close(
        losses.dist(s, t, beta=2.0, gamma=0.5, temperature=4.0),
        np_dist(s.numpy(), t.numpy(), 2.0, 0.5, 4.0),
    )


def test_dist_is_unchanged_by_a_shift_of_the_logits():
    s, t = rand(7, 6, seed=15, scale=2), rand(7, 6, seed=16, scale=2)
    shift_s, shift_t = rand(7, 1, seed=17, scale=5), rand(7, 1, seed=18, scale=5)
    for temp in (1.0, 4.0):
        close(
            losses.dist(s + shift_s, t + shift_t, temperature=temp),
            losses.dist(s, t, temperature=temp),
            atol=1e-12,
        )


def test_dist_is_zero_for_a_positive_affine_student():
    """Student probabilities a·p_T + (1 - a)/V (a > 0) correlate perfectly with the
    teacher's, both per sample (inter-class) and per class (intra-class): the loss is zero
    (exactly without the authors' 1e-8 guard in the correlation's denominator, and within
    T²·(beta + gamma)·1e-8 / min(norm product) with it)."""
    temp, classes = 4.0, 6
    t = rand(8, classes, seed=19, scale=3)
    p_t = torch.softmax(t / temp, dim=-1)
    for a in (0.3, 0.8, 1.0, 1.05):
        p_s = a * p_t + (1 - a) / classes
        assert (p_s > 0).all()
        s = temp * torch.log(p_s) + rand(8, 1, seed=20)  # any per-sample shift
        close(losses.dist(s, t, temperature=temp, eps=0.0), 0.0, atol=1e-12)
        centred = [p - p.mean(dim=1, keepdim=True) for p in (p_s, p_t, p_s.t(), p_t.t())]
        norms = [c.norm(dim=1) for c in centred]
        smallest = min(float((norms[0] * norms[1]).min()), float((norms[2] * norms[3]).min()))
        bound = temp**2 * 2 * 1e-8 / smallest
        assert 0.0 <= float(losses.dist(s, t, temperature=temp)) <= bound
    assert float(losses.dist(rand(8, classes, seed=21), t, temperature=temp)) > 0.1


def test_dist_takes_sequences():
    s, t = rand(2, 3, 5, seed=22), rand(2, 3, 5, seed=23)
    close(losses.dist(s, t), losses.dist(s.reshape(6, 5), t.reshape(6, 5)), atol=1e-12)


# ---------------------------------------------------------------------------- LS
def test_ls_pinned_value():
    s, t = rand(6, 7, seed=24, scale=2), rand(6, 7, seed=25, scale=5)
    zs = np.stack([np_zscore(r) for r in s.numpy()])
    zt = np.stack([np_zscore(r) for r in t.numpy()])
    close(losses.ls(s, t), np_kd(zs, zt, 2.0))
    close(losses.ls(s, t, temperature=3.0), np_kd(zs, zt, 3.0))
    torch.testing.assert_close(
        losses.standardize_logits(s), torch.from_numpy(zs), rtol=0, atol=1e-12
    )


def test_ls_is_invariant_to_shift_and_positive_scale():
    s, t = rand(6, 7, seed=26), rand(6, 7, seed=27)
    scale_s = rand(6, 1, seed=28).abs() + 0.5
    scale_t = rand(6, 1, seed=29).abs() + 0.5
    moved = losses.ls(scale_s * s + rand(6, 1, seed=30, scale=4), scale_t * t - 3.0)
    close(moved, losses.ls(s, t))
    with pytest.raises(ShapeMismatchError, match="at least 2 classes"):
        losses.ls(rand(3, 1), rand(3, 1))


# ---------------------------------------------------------------------------- TAID
def test_taid_pinned_value():
    s, t = rand(5, 6, seed=31, scale=2), rand(5, 6, seed=32, scale=2)
    for mix in (0.0, 0.4, 0.75, 1.0):
        close(losses.taid(s, t, mix), np_taid(s.numpy(), t.numpy(), mix))


def test_taid_target_ends_at_the_teacher_and_the_detached_student():
    s = rand(4, 6, seed=33, scale=2).requires_grad_()
    t = rand(4, 6, seed=34, scale=2)
    at_one = losses.taid_target(s, t, 1.0)
    torch.testing.assert_close(at_one, torch.softmax(t, -1), rtol=0, atol=1e-12)
    at_zero = losses.taid_target(s, t, 0.0)
    torch.testing.assert_close(at_zero, torch.softmax(s.detach(), -1), rtol=0, atol=1e-12)
    assert not at_zero.requires_grad and not losses.taid_target(s, t, 0.5).requires_grad
    close(losses.taid(s, t, 0.0).detach(), 0.0, atol=1e-12)
    close(
        losses.taid(s, t, 1.0).detach(), losses.kd(s, t, 1.0).detach(), atol=1e-12
    )  # forward KL to the teacher
    losses.taid(s, t, 0.6).backward()
    assert s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        losses.taid(s, t, 1.5)


# ---------------------------------------------------------------------------- ND
def test_nd_pinned_value():
    s, t = rand(6, 5, seed=35, scale=2), rand(6, 5, seed=36, scale=2)
    means, y = rand(4, 5, seed=37), labels(6, 4, seed=38)
    close(losses.nd(s, t, means, y), np_nd(s.numpy(), t.numpy(), means.numpy(), y.numpy()))


def test_nd_rewards_direction_and_norm_up_to_the_teachers():
    means = rand(3, 4, seed=39)
    y = torch.tensor([0, 2])
    t = rand(2, 4, seed=40)
    direction = means[y] / means[y].norm(dim=1, keepdim=True)
    t_norm = t.norm(dim=1, keepdim=True)
    close(losses.nd(2 * t_norm * direction, t, means, y), 0.0, atol=1e-12)  # aligned, larger
    close(losses.nd(0.5 * t_norm * direction, t, means, y), 0.5, atol=1e-12)  # aligned, half
    with pytest.raises(ShapeMismatchError, match="class_means"):
        losses.nd(t, t, rand(3, 5), y)
    with pytest.raises(ShapeMismatchError, match="one class index per sample"):
        losses.nd(t, t, means, y[:1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        losses.nd(t, t, means, torch.tensor([0, 3]))


# ---------------------------------------------------------------------------- OFA
def test_ofa_pinned_value():
    s, t, y = rand(6, 5, seed=41, scale=2), rand(6, 5, seed=42, scale=2), labels(6, 5, seed=43)
    for eps, temp in ((1.0, 1.0), (1.5, 1.0), (1.2, 2.0)):
        close(
            losses.ofa(s, t, y, eps=eps, temperature=temp),
            np_ofa(s.numpy(), t.numpy(), y.numpy(), eps, temp),
        )


def test_ofa_with_eps_one_is_cross_entropy_to_the_teacher():
    """(p_T + 1_y)^1 - 1_y = p_T: the target enhancement vanishes at eps = 1."""
    s, t, y = rand(6, 5, seed=44), rand(6, 5, seed=45), labels(6, 5, seed=46)
    p_t = torch.softmax(t, -1)
    hand = -(p_t * torch.log_softmax(s, -1)).sum(-1).mean()
    close(losses.ofa(s, t, y, eps=1.0), hand, atol=1e-12)
    # = KD at T = 1 plus the teacher's entropy
    entropy = -(p_t * torch.log(p_t)).sum(-1).mean()
    close(losses.ofa(s, t, y, eps=1.0), losses.kd(s, t, 1.0) + entropy, atol=1e-12)
    # eps > 1 moves weight onto the target class
    assert float(losses.ofa(s, t, y, eps=1.5)) != pytest.approx(float(hand))


def test_ofa_takes_sequences():
    s, t, y = rand(2, 3, 5, seed=47), rand(2, 3, 5, seed=48), labels(6, 5, seed=49)
    flat = losses.ofa(s.reshape(6, 5), t.reshape(6, 5), y, eps=1.5)
    close(losses.ofa(s, t, y.reshape(2, 3), eps=1.5), flat, atol=1e-12)


def test_losses_are_exported():
    for name in ("dkd", "dist", "ls", "taid", "taid_target", "nd", "ofa", "standardize_logits"):
        assert name in losses.__all__ and callable(getattr(losses, name))


def test_class_indices_out_of_range_are_a_library_error_naming_the_range():
    from flowdistill.errors import FlowdistillError, ValueRangeError

    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueRangeError, match=r"dkd: target class indices must lie in \[0, 5\) "
                       r"\(got -100 to 2\)") as err:  # fmt: skip
        losses.dkd(s, t, torch.tensor([0, 2, -100]))  # padding where DKD needs a label
    assert isinstance(err.value, FlowdistillError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "loss",
    [
        lambda s, t, y, m: losses.kd(s, t, 2.0, m),
        lambda s, t, y, m: losses.dkd(s, t, y, mask=m),
        lambda s, t, y, m: losses.dist(s, t, mask=m),
        lambda s, t, y, m: losses.ls(s, t, mask=m),
        lambda s, t, y, m: losses.taid(s, t, 0.6, m),
    ],
    ids=["kd", "dkd", "dist", "ls", "taid"],
)
def test_left_out_positions_give_neither_value_nor_gradient(loss):
    """Whatever padded positions hold (NaN, inf), a masked logit loss has the value and the
    gradient it has with finite junk there; the left-out rows get no gradient."""
    s, t = rand(3, 5, 7, seed=1, scale=2.0), rand(3, 5, 7, seed=2, scale=2.0)
    y = labels(15, 7).view(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 4] = False
    y = torch.where(mask, y, -100)
    clean = s.clone().requires_grad_()
    expected = loss(clean, t, y, mask)
    expected.backward()
    spoiled_s, spoiled_t = s.clone(), t.clone()
    spoiled_s[~mask], spoiled_t[~mask] = float("nan"), float("inf")
    spoiled_s.requires_grad_()
    value = loss(spoiled_s, spoiled_t, y, mask)
    value.backward()
    close(value.detach(), expected.detach())
    assert torch.isfinite(spoiled_s.grad).all() and not spoiled_s.grad[~mask].any()
    torch.testing.assert_close(spoiled_s.grad[mask], clean.grad[mask])

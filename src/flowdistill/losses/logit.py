"""Losses on logits. Logits may have any number of leading dimensions (``(B, V)`` or
``(B, T, V)``); the class dimension is the last one. Targets, where a loss takes them, have
the logits' leading shape (``(B,)`` or ``(B, T)``), and so has ``mask``, where a loss takes
one: ``True`` (or 1) at the positions that count, so that padding is left out. A masked loss
equals the same loss on the counted positions alone; the mask weighs positions rather than
selecting them, so that a training step never waits for the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._values import check_index_range, values_readable
from ..errors import ConfigError, ShapeMismatchError
from .lm import masked_mean, zero_rows

__all__ = ["dist", "dkd", "kd", "ls", "standardize_logits", "taid", "taid_target"]


def kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Hinton et al. (2015) knowledge distillation.

    .. math:: \mathcal{L} = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t/T) \,\|\,
              \mathrm{softmax}(z_s/T)\big)

    averaged over every position (all dimensions but the last), or over those where
    ``mask`` is true. The :math:`T^2` factor keeps gradient magnitudes comparable across
    temperatures. Computed in float32 or wider.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"kd: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    keep = position_mask("kd", mask, student_logits)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype).flatten(0, -2) / temperature
    t = teacher_logits.to(dtype).flatten(0, -2) / temperature
    s, t = zero_rows(keep, s, t)
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return masked_mean(kl, keep) * temperature**2


def position_mask(
    name: str, mask: torch.Tensor | None, values: torch.Tensor
) -> torch.Tensor | None:
    """``mask`` as ``(N,)`` booleans over the rows of ``values`` (all dimensions but the
    last flattened), after checking that it has ``values``' leading shape."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(values.shape[:-1]):
        raise ShapeMismatchError(
            f"{name}: mask {tuple(mask.shape)} must have the leading shape "
            f"{tuple(values.shape[:-1])} of {tuple(values.shape)} (one entry per position)"
        )
    return mask.reshape(-1).bool()


# ---------------------------------------------------------------------------- helpers
def _rows(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits as ``(N, V)`` rows in float32 or wider, after checking their shapes."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if student_logits.ndim < 2:
        raise ShapeMismatchError(
            f"{name}: logits need a batch and a class dimension, got shape "
            f"{tuple(student_logits.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    return (
        student_logits.to(dtype).flatten(0, -2),
        teacher_logits.to(dtype).flatten(0, -2),
    )


def _targets(name: str, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Class indices as ``(N,)`` matching the logits' leading shape, range-checked."""
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ShapeMismatchError(
            f"{name}: target has shape {tuple(target.shape)} but the logits "
            f"{tuple(logits.shape)} need one class index per position "
            f"{tuple(logits.shape[:-1])}"
        )
    y = target.reshape(-1).long()
    classes = logits.shape[-1]
    check_index_range(y, classes, f"{name}: target class indices must lie in [0, {classes})")
    return y


def _binary_kl(log_b_t: torch.Tensor, log_b_s: torch.Tensor) -> torch.Tensor:
    """Row-wise KL between distributions given by their log-probabilities."""
    return (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=-1)


# ---------------------------------------------------------------------------- DKD
def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation",
    CVPR 2022).

    With :math:`p = \mathrm{softmax}(z/T)`, the binary target/non-target distribution
    :math:`b = (p_y,\ 1 - p_y)` and the distribution among the non-target classes
    :math:`\hat p_i = p_i / (1 - p_y)` (:math:`i \ne y`, equivalently the softmax of the
    non-target logits),

    .. math:: \mathrm{TCKD} = \mathrm{KL}(b^T \,\|\, b^S), \qquad
              \mathrm{NCKD} = \mathrm{KL}(\hat p^T \,\|\, \hat p^S),

    .. math:: \mathcal{L} = T^2 \big(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}\big)

    averaged over every position (or those where ``mask`` is true; a left-out position's
    target may be anything, such as the padding index -100). Classical KD decomposes as
    :math:`\mathrm{KL}(p^T\|p^S) = \mathrm{TCKD} + (1 - p^T_y)\,\mathrm{NCKD}` (the paper's
    Eq. 1, :math:`p^T_y` the teacher's softened target probability); DKD drops that
    coupling weight. The authors' defaults (mdistiller): ``alpha = 1``, ``beta = 8``,
    ``T = 4``. Non-target terms are computed on the non-target logits exactly rather than
    by subtracting 1000 from the target logit, and the binary terms in log-space.
    """
    s, t = _rows("dkd", student_logits, teacher_logits)
    keep = position_mask("dkd", mask, student_logits)
    s, t = zero_rows(keep, s, t)
    if keep is not None and tuple(target.shape) == tuple(student_logits.shape[:-1]):
        target = torch.where(keep.view(target.shape), target, 0)  # any class: not counted
    y = _targets("dkd", target, student_logits)
    n, classes = s.shape
    if classes < 2:
        raise ShapeMismatchError(f"dkd: needs at least 2 classes, got {classes}")
    s, t = s / temperature, t / temperature
    others = torch.arange(classes - 1, device=y.device)[None, :]  # (1, C-1)
    others = others + (others >= y[:, None]).long()  # (N, C-1): every class but y
    s_other, t_other = s.gather(1, others), t.gather(1, others)
    lse_s, lse_t = torch.logsumexp(s, dim=-1), torch.logsumexp(t, dim=-1)
    log_b_s = torch.stack(
        [s.gather(1, y[:, None])[:, 0] - lse_s, torch.logsumexp(s_other, dim=-1) - lse_s], -1
    )
    log_b_t = torch.stack(
        [t.gather(1, y[:, None])[:, 0] - lse_t, torch.logsumexp(t_other, dim=-1) - lse_t], -1
    )
    tckd = _binary_kl(log_b_t, log_b_s)
    nckd = _binary_kl(F.log_softmax(t_other, dim=-1), F.log_softmax(s_other, dim=-1))
    return masked_mean(alpha * tckd + beta * nckd, keep) * temperature**2


# ---------------------------------------------------------------------------- DIST
def _pearson(
    a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` (cosine of centred rows, with
    ``eps`` added to the product of norms, as the authors' code); with ``keep`` (booleans
    over the columns) only the kept columns enter, as if the others were not there."""
    if keep is None:
        a = a - a.mean(dim=1, keepdim=True)
        b = b - b.mean(dim=1, keepdim=True)
    else:
        w = keep.to(a.dtype)[None, :]
        count = w.sum().clamp_min(1.0)
        a = (a - (a * w).sum(dim=1, keepdim=True) / count) * w
        b = (b - (b * w).sum(dim=1, keepdim=True) / count) * w
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With :math:`Y = \mathrm{softmax}(Z/T)` as an ``(N, V)`` matrix (positions by classes)
    and :math:`\rho` the Pearson correlation,

    .. math:: \mathcal{L}_{inter} = 1 - \frac1N \sum_n \rho(Y^S_{n,:}, Y^T_{n,:}), \qquad
              \mathcal{L}_{intra} = 1 - \frac1V \sum_c \rho(Y^S_{:,c}, Y^T_{:,c}),

    .. math:: \mathcal{L} = T^2 \big(\beta\,\mathcal{L}_{inter} + \gamma\,\mathcal{L}_{intra}\big).

    The inter-class relation correlates each position's class probabilities; the
    intra-class relation correlates each class's probabilities across the positions of the
    batch (all leading dimensions flattened, as the authors do for dense outputs); with
    ``mask`` only the counted positions enter either relation.
    :math:`\rho` is a cosine of centred vectors with ``eps = 1e-8`` added to the product of
    norms (the authors' guard; it biases a perfect correlation down by about
    ``eps / (norm · norm)``).
    Defaults of the authors' loss: ``beta = gamma = 1``, ``T = 1`` (their ImageNet
    setting; their CIFAR-100 setting is ``T = 4``, both with loss weight 2).
    """
    s, t = _rows("dist", student_logits, teacher_logits)
    keep = position_mask("dist", mask, student_logits)
    s, t = zero_rows(keep, s, t)
    y_s = F.softmax(s / temperature, dim=-1)
    y_t = F.softmax(t / temperature, dim=-1)
    inter = 1.0 - masked_mean(_pearson(y_s, y_t, eps), keep)
    intra = 1.0 - _pearson(y_s.t(), y_t.t(), eps, keep).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# ---------------------------------------------------------------------------- LS
def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    r"""Z-score each position's logits: :math:`(z - \bar z) / (\sigma(z) + \epsilon)`, with
    :math:`\sigma` the unbiased standard deviation over the classes (the last dimension),
    as in the code of Sun et al. (CVPR 2024)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def ls(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""KD on standardised logits (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024).

    .. math:: \mathcal{L} = T^2\,\mathrm{KL}\big(\mathrm{softmax}(\mathcal Z(z_t)/T)\,\|\,
              \mathrm{softmax}(\mathcal Z(z_s)/T)\big), \qquad
              \mathcal Z(z) = \frac{z - \bar z}{\sigma(z) + 10^{-7}}

    (:func:`standardize_logits`, unbiased :math:`\sigma` over the classes), averaged over
    every position (or those where ``mask`` is true). Each network's effective temperature
    is thus :math:`T\sigma(z)`, and the loss is invariant to a shift and a positive scale of
    either network's logits.
    Default base temperature ``T = 2`` (the authors' ``--base-temp``); they weight the term
    by 9 with cross-entropy weight 0.1.
    """
    s, t = _rows("ls", student_logits, teacher_logits)
    s, t = zero_rows(position_mask("ls", mask, student_logits), s, t)
    if s.shape[-1] < 2:
        raise ShapeMismatchError(f"ls: standardising needs at least 2 classes, got {s.shape[-1]}")
    s = standardize_logits(s).view(student_logits.shape)
    return kd(s, standardize_logits(t).view(teacher_logits.shape), temperature, mask)


# ---------------------------------------------------------------------------- TAID
def _check_t(name: str, t: float | torch.Tensor) -> None:
    if isinstance(t, torch.Tensor) and not values_readable(t):
        return  # not read from a device (see flowdistill._values)
    value = float(t)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: the interpolation parameter t must lie in [0, 1], got {value}")


def taid_target(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    t: float | torch.Tensor,
) -> torch.Tensor:
    r"""TAID's intermediate distribution
    :math:`p_t = \mathrm{softmax}\big((1 - t)\,\mathrm{sg}(z_s) + t\,z_t\big)`
    (``sg``: stop-gradient), in the logits' shape, float32 or wider."""
    _check_t("taid_target", t)
    s, z = _rows("taid_target", student_logits, teacher_logits)
    mixed = (1.0 - t) * s.detach() + t * z
    return F.softmax(mixed, dim=-1).view(student_logits.shape)


def taid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    t: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Temporally adaptive interpolated distillation (Shing et al., "TAID: Temporally
    Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language
    Models", ICLR 2025).

    .. math:: \mathcal{L} = \mathrm{KL}\big(p_t \,\|\, \mathrm{softmax}(z_s)\big), \qquad
              p_t = \mathrm{softmax}\big((1 - t)\,\mathrm{sg}(z_s) + t\,z_t\big)

    (:func:`taid_target`), averaged over every position (or over those where ``mask``, of
    the logits' leading shape, is true); no temperature. At ``t = 1`` this
    is the forward KL to the teacher, at ``t = 0`` it is zero. The authors' code reports
    the cross-entropy :math:`-\sum p_t \log q_s`, which differs by the entropy of
    :math:`p_t` (constant for the student's gradient). The schedule of ``t`` lives in the
    ``taid`` method.
    """
    s, z = _rows("taid", student_logits, teacher_logits)
    keep = position_mask("taid", mask, student_logits)
    s, z = zero_rows(keep, s, z)
    p_t = taid_target(s, z, t)
    log_q = F.log_softmax(s, dim=-1)
    kl = (torch.xlogy(p_t, p_t) - p_t * log_q).sum(dim=-1)
    return masked_mean(kl, keep)

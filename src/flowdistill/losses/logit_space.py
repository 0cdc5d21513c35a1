"""Losses that act in the logit (class) space of a network: on penultimate embeddings read
against class centres (ND), and on logits predicted by branch heads (OFA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._values import check_index_range
from ..errors import ShapeMismatchError
from .logit import _rows, _targets

__all__ = ["nd", "ofa"]


def nd(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    class_means: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    r"""Norm-and-direction loss (Wang et al., "Improving Knowledge Distillation via
    Regularizing Feature Norm and Direction", the ND loss of KD++).

    With :math:`e_c = \mu_c / \lVert\mu_c\rVert` the direction of the teacher's mean
    embedding of class :math:`c`, and :math:`s_i`, :math:`t_i` the student's and the
    teacher's penultimate embeddings of sample :math:`i` with label :math:`y_i`,

    .. math:: \mathcal{L} = \frac1B \sum_i \Big(1 - \frac{\langle s_i, e_{y_i}\rangle}
              {\max(\lVert s_i\rVert, \lVert t_i\rVert)}\Big).

    The projection onto the class direction aligns the student's direction with the
    teacher's class centre; dividing by the larger of the two norms (not by the student's
    own) keeps rewarding a larger student norm until it exceeds the teacher's. As in the
    authors' code, the norms are not detached. Both guards against a zero norm (``1e-12``)
    are additions. ``class_means`` is ``(C, D)``, the embeddings ``(B, D)``, ``target``
    ``(B,)`` class indices.
    """
    if student_embedding.ndim != 2 or student_embedding.shape != teacher_embedding.shape:
        raise ShapeMismatchError(
            f"nd: student and teacher embeddings must both be (batch, dim), got "
            f"{tuple(student_embedding.shape)} and {tuple(teacher_embedding.shape)}"
        )
    if class_means.ndim != 2 or class_means.shape[1] != student_embedding.shape[1]:
        raise ShapeMismatchError(
            f"nd: class_means must be (classes, {student_embedding.shape[1]}), got "
            f"{tuple(class_means.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_embedding.dtype, teacher_embedding.dtype),
        torch.promote_types(class_means.dtype, torch.float32),
    )
    s, t = student_embedding.to(dtype), teacher_embedding.to(dtype)
    if tuple(target.shape) != (s.shape[0],):
        raise ShapeMismatchError(
            f"nd: target must hold one class index per sample ({s.shape[0]},), got "
            f"{tuple(target.shape)}"
        )
    y = target.long()
    classes = class_means.shape[0]
    check_index_range(y, classes, f"nd: target class indices must lie in [0, {classes})")
    e = F.normalize(class_means.to(dtype)[y], dim=1, eps=1e-12)
    max_norm = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(1e-12)
    return (1.0 - (s * e).sum(dim=1) / max_norm).mean()


def ofa(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""OFA loss with adaptive target enhancement (Hao et al., "One-for-All: Bridge the Gap
    Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023).

    With :math:`p^T = \mathrm{softmax}(z_t/T)`, :math:`q = \mathrm{softmax}(z_s/T)` and
    :math:`\mathbb 1_y` the one-hot target,

    .. math:: \mathcal{L} = -\sum_c \big[(p^T_c + \mathbb 1_{y}(c))^{\epsilon}
              - \mathbb 1_{y}(c)\big] \log q_c

    averaged over every position: the target class is weighted by
    :math:`(1 + p^T_y)^\epsilon - 1` and every other class by :math:`(p^T_c)^\epsilon`.
    With :math:`\epsilon = 1` it is the cross-entropy to the teacher,
    :math:`-\sum_c p^T_c \log q_c`; :math:`\epsilon > 1` enhances the target class relative to
    the rest, the more so the less confident the teacher. No :math:`T^2` factor, as in the
    authors' code. Defaults ``eps = 1`` (their CIFAR-100 setting; 1.5 on ImageNet), ``T = 1``.
    """
    s, t = _rows("ofa", student_logits, teacher_logits)
    y = _targets("ofa", target, student_logits)
    mask = F.one_hot(y, s.shape[-1]).to(s.dtype)
    p_t = F.softmax(t / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    weight = (p_t + mask) ** eps - mask
    return -(weight * log_q).sum(dim=-1).mean()

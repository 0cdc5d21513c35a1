"""Losses on logits. Logits may have any number of leading dimensions (``(B, V)`` or
``(B, T, V)``); the class dimension is the last one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd"]


def kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
) -> torch.Tensor:
    r"""Hinton et al. (2015) knowledge distillation.

    .. math:: \mathcal{L} = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t/T) \,\|\,
              \mathrm{softmax}(z_s/T)\big)

    averaged over every position (all dimensions but the last). The :math:`T^2` factor keeps
    gradient magnitudes comparable across temperatures. Computed in float32 or wider.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype).flatten(0, -2) / temperature
    t = teacher_logits.to(dtype).flatten(0, -2) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * temperature**2

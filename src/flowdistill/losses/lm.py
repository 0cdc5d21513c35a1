r"""Per-token losses for causal language models.

Logits are ``(B, T, V)`` (any leading shape works: the vocabulary is the last dimension);
``mask`` has the leading shape, ``True`` (or 1) where a token counts: padding and prompt
positions are left out. Every loss is the mean over the counted tokens of a per-token value,
computed in float32 (or wider) whatever the logits' dtype, so that it is exact under bf16
autocast.

The mask weighs the rows rather than selecting them, so that a training step never waits
for the device to count the kept rows (and a compiled graph keeps static shapes). Memory:
with ``chunk_size`` the rows are processed in chunks whose float32 softmaxes are recomputed
in the backward pass instead of being kept (activation checkpointing), so the float32
copies alive at once are ``chunk_size x V``.

With :math:`p = \mathrm{softmax}(z_t / T)` (teacher) and :math:`q = \mathrm{softmax}(z_s / T)`
(student):

* :func:`forward_kl` -- :math:`T^2\,\mathrm{KL}(p \| q)` (mode covering; Hinton's KD);
* :func:`reverse_kl` -- :math:`T^2\,\mathrm{KL}(q \| p)` (mode seeking; MiniLLM's objective);
* :func:`skew_forward_kl` -- :math:`\mathrm{KL}(p \| \alpha p + (1-\alpha) q)` and
  :func:`skew_reverse_kl` -- :math:`\mathrm{KL}(q \| \alpha q + (1-\alpha) p)` (DistiLLM,
  Ko et al., ICML 2024; ``alpha = 0.1``);
* :func:`jensen_shannon` -- generalised JSD
  :math:`\beta\,\mathrm{KL}(p \| m) + (1-\beta)\,\mathrm{KL}(q \| m)`,
  :math:`m = \beta p + (1-\beta) q`;
* :func:`token_cross_entropy` -- next-token cross-entropy on targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, ShapeMismatchError

__all__ = [
    "forward_kl",
    "jensen_shannon",
    "masked_mean",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_cross_entropy",
]


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all when ``None``); a
    left-out value never enters the mean, not even a non-finite one (its gradient is 0 here;
    a non-finite value's own inputs may still get NaN gradients from it: the LM losses zero
    the left-out rows of their logits first)."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ShapeMismatchError(f"mask {tuple(mask.shape)} vs values {tuple(values.shape)}")
    keep = mask.bool()
    count = keep.sum().to(values.dtype).clamp_min(1.0)
    return torch.where(keep, values, 0.0).sum() / count


def zero_rows(keep: torch.Tensor | None, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(N, V)`` ``rows`` with those ``keep`` leaves out set to 0, so that whatever they
    hold (NaN or inf from a model at padded positions, say) gives neither a value nor a
    gradient; unchanged where ``keep`` is ``None``."""
    if keep is None:
        return rows
    return tuple(torch.where(keep[:, None], r, 0.0) for r in rows)


def _rows(
    name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Both logits as rows ``(N, V)`` (teacher detached) and which rows count, ``(N,)``
    booleans (``None``: all)."""
    if student.shape != teacher.shape:
        hint = " (teacher and student vocabularies differ)" if student.shape[:-1] == (
            teacher.shape[:-1]) else ""  # fmt: skip
        raise ShapeMismatchError(
            f"{name}: student logits {tuple(student.shape)} vs teacher logits "
            f"{tuple(teacher.shape)}{hint}"
        )
    s, t = student.flatten(0, -2), teacher.detach().flatten(0, -2)
    if mask is None:
        return s, t, None
    if tuple(mask.shape) != tuple(student.shape[:-1]):
        raise ShapeMismatchError(
            f"{name}: mask {tuple(mask.shape)} must have the logits' leading shape "
            f"{tuple(student.shape[:-1])}"
        )
    return s, t, mask.flatten().bool()


def _reduce(
    per_row: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """Mean of ``per_row(s_chunk, t_chunk)`` (a ``(n,)`` tensor per chunk) over the rows
    that ``keep`` (0 when none is kept)."""
    n = s.shape[0]
    dtype = torch.promote_types(s.dtype, torch.float32)
    if n == 0:
        return s.new_zeros((), dtype=dtype)

    def kept_sum(a: torch.Tensor, b: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        a, b = zero_rows(k, a, b)  # (left-out rows: no value, no gradient)
        values = per_row(a, b)
        return (values if k is None else torch.where(k, values, 0.0)).sum()

    count = n if keep is None else keep.sum().clamp_min(1).to(dtype)
    if chunk_size is None or chunk_size >= n:
        return kept_sum(s, t, keep) / count
    total = s.new_zeros((), dtype=dtype)
    for i in range(0, n, chunk_size):
        sc, tc = s[i : i + chunk_size], t[i : i + chunk_size]
        kc = None if keep is None else keep[i : i + chunk_size]
        if sc.requires_grad:
            part = checkpoint(kept_sum, sc, tc, kc, use_reentrant=False)
        else:
            part = kept_sum(sc, tc, kc)
        total = total + part
    return total / count


def _log_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    dtype = torch.promote_types(z.dtype, torch.float32)
    return F.log_softmax(z.to(dtype) / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    # KL(a || b) per row from log-probabilities, (N,)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _check(name: str, temperature: float, **unit: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"{name}: temperature must be > 0, got {temperature}")
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}: {key} must lie in [0, 1], got {value}")


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r""":math:`T^2\,\mathrm{KL}(p_{teacher} \| q_{student})` per token, mean over the mask."""
    _check("forward_kl", temperature)
    s, t, keep = _rows("forward_kl", student_logits, teacher_logits, mask)

    def per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _kl(_log_probs(b, temperature), _log_probs(a, temperature))

    return _reduce(per_row, s, t, keep, chunk_size) * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r""":math:`T^2\,\mathrm{KL}(q_{student} \| p_{teacher})` per token, mean over the mask."""
    _check("reverse_kl", temperature)
    s, t, keep = _rows("reverse_kl", student_logits, teacher_logits, mask)

    def per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _kl(_log_probs(a, temperature), _log_probs(b, temperature))

    return _reduce(per_row, s, t, keep, chunk_size) * temperature**2


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    # log(weight * a + (1 - weight) * b), stable; weight in [0, 1]
    if weight <= 0.0:
        return log_b
    if weight >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Skew KL :math:`\mathrm{KL}(p \| \alpha p + (1 - \alpha) q)` (DistiLLM); ``alpha=0``
    is the forward KL. Mean over the mask."""
    _check("skew_forward_kl", temperature, alpha=alpha)
    s, t, keep = _rows("skew_forward_kl", student_logits, teacher_logits, mask)

    def per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        log_p, log_q = _log_probs(b, temperature), _log_probs(a, temperature)
        return _kl(log_p, _log_mix(log_p, log_q, alpha))

    return _reduce(per_row, s, t, keep, chunk_size) * temperature**2


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Skew reverse KL :math:`\mathrm{KL}(q \| \alpha q + (1 - \alpha) p)` (DistiLLM);
    ``alpha=0`` is the reverse KL. Mean over the mask."""
    _check("skew_reverse_kl", temperature, alpha=alpha)
    s, t, keep = _rows("skew_reverse_kl", student_logits, teacher_logits, mask)

    def per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        log_p, log_q = _log_probs(b, temperature), _log_probs(a, temperature)
        return _kl(log_q, _log_mix(log_q, log_p, alpha))

    return _reduce(per_row, s, t, keep, chunk_size) * temperature**2


def jensen_shannon(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Generalised Jensen-Shannon divergence
    :math:`\beta\,\mathrm{KL}(p \| m) + (1-\beta)\,\mathrm{KL}(q \| m)`,
    :math:`m = \beta p + (1 - \beta) q` (symmetric at ``beta=0.5``). Mean over the mask."""
    _check("jensen_shannon", temperature, beta=beta)
    s, t, keep = _rows("jensen_shannon", student_logits, teacher_logits, mask)

    def per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        log_p, log_q = _log_probs(b, temperature), _log_probs(a, temperature)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)

    return _reduce(per_row, s, t, keep, chunk_size) * temperature**2


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy (nats per token) in float32, mean over the mask."""
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeMismatchError(
            f"targets {tuple(targets.shape)} must have the logits' leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    per_token = F.cross_entropy(
        logits.flatten(0, -2).to(dtype), targets.flatten(), reduction="none"
    ).view(targets.shape)
    return masked_mean(per_token, mask)

r"""Losses on intermediate features (vectors ``(B, D)``, maps ``(B, C, H, W)``, tokens
``(B, N, D)``).

Each function is the loss of one classic feature-distillation baseline, written from its
paper with the defaults of its authors' public code; the registered distiller of the same
method calls it, so a user's own loop gets the engine's numbers. Every loss is computed in
float32 or wider whatever the input precision.

``hint`` and ``pkd`` also take a ``mask`` for token sequences ``(B, N, D)``: booleans
``(B, N)``, true at the positions that count, so that padding is left out (a masked loss
equals the same loss on the counted positions alone).

Besides the losses, two helpers used by the map-based methods live here (not exported by
``flowdistill.losses``): :func:`as_map` views any feature as a ``(B, C, H, W)`` map and
:func:`pool_to_common` average-pools two maps to their common spatial size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ShapeMismatchError
from .lm import masked_mean
from .logit import position_mask

__all__ = [
    "at",
    "attention_map",
    "crd_nce",
    "crd_nce_bank",
    "crd_normalizer",
    "hcl",
    "hint",
    "info_nce",
    "pkd",
    "pkt",
    "rkd",
    "sp",
    "vid",
]


def _wide(*xs: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in float32 or wider (their common promoted type)."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _same_batch(name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    if s.ndim < 2 or t.ndim < 2 or s.shape[0] != t.shape[0]:
        raise ShapeMismatchError(
            f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} features must be "
            "batches of the same size (batch dimension first)"
        )


def _same_shape(name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise ShapeMismatchError(
            f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} features differ in "
            "shape; map the student feature with a regressor/adapter first"
        )


# ---------------------------------------------------------------------------- map helpers
def _token_grid(tokens: int) -> tuple[int, int] | None:
    """``(drop, side)``: the tokens form a ``side × side`` grid after dropping ``drop``
    leading (class) tokens."""
    for drop in (0, 1):
        side = math.isqrt(max(tokens - drop, 0))
        if side > 0 and side * side == tokens - drop:
            return drop, side
    return None


def map_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The per-sample ``(C, H, W)`` shape :func:`as_map` gives a feature of per-sample
    ``shape``: maps unchanged, vectors ``(D,)`` as ``(D, 1, 1)``, tokens ``(N, D)`` as a
    ``(D, h, w)`` grid (a leading class token dropped) or, when ``N`` is no square grid, as
    ``(D, N, 1)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 1:
        return (shape[0], 1, 1)
    if len(shape) == 2:
        grid = _token_grid(shape[0])
        if grid is None:
            return (shape[1], shape[0], 1)
        return (shape[1], grid[1], grid[1])
    raise ShapeMismatchError(f"feature shape {shape} is not a vector, token sequence or map")


def as_map(x: torch.Tensor) -> torch.Tensor:
    """View a batch of features as ``(B, C, H, W)`` maps (see :func:`map_shape`)."""
    if x.ndim == 4:
        return x
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim == 3:
        grid = _token_grid(x.shape[1])
        if grid is None:
            return x.transpose(1, 2).unsqueeze(-1)
        drop, side = grid
        return x[:, drop:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    raise ShapeMismatchError(
        f"a feature batch of shape {tuple(x.shape)} is not a vector, token sequence or map batch"
    )


def pool_to_common(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool two ``(B, C, H, W)`` maps to their common (smallest) spatial size, as the
    AT and VID reference code does when student and teacher resolutions differ."""
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


# ---------------------------------------------------------------------------- FitNets
def hint(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    .. math:: \mathcal{L} = \frac{1}{n}\sum_i \big(r(s)_i - t_i\big)^2

    the mean squared error between the *regressed* student feature :math:`r(s)` (the caller
    applies the regressor) and the teacher's hint feature, averaged over every element, as
    in the authors' and RepDistiller's code (``nn.MSELoss``); with ``mask`` (the leading
    shape of token features), over the elements of the counted positions.
    """
    _same_shape("hint", student_feature, teacher_feature)
    s, t = _wide(student_feature, teacher_feature)
    if mask is None:
        return F.mse_loss(s, t)
    keep = position_mask("hint", mask, s)
    return masked_mean((s - t).pow(2).mean(dim=-1).reshape(-1), keep)


# ---------------------------------------------------------------------------- AT
def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    r"""Spatial attention map of Zagoruyko & Komodakis: :math:`Q = \mathrm{vec}\big(
    \tfrac{1}{C}\sum_c |A_c|^p\big)` L2-normalised per sample, shape ``(B, H·W)``."""
    f = as_map(feature)
    q = f.abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def at(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention",
    ICLR 2017), activation-based spatial attention.

    .. math:: \mathcal{L} = \frac{1}{B\,HW}\sum_{b,j}
              \Big(\frac{Q_s}{\lVert Q_s\rVert_2} - \frac{Q_t}{\lVert Q_t\rVert_2}\Big)_{b,j}^2,
              \qquad Q = \mathrm{vec}\Big(\frac{1}{C}\sum_c |A_c|^p\Big)

    as in the authors' code (squared difference averaged over batch and positions; the
    method's weight, 1000 in their code, is applied by the caller). Maps of different
    resolutions are average-pooled to the smaller one; channel counts may differ. Token
    sequences ``(B, N, D)`` are spatial features too (a square grid, or one position per
    token); vectors have no spatial extent and raise :class:`ShapeMismatchError`.
    """
    for name, f in (("student", student_feature), ("teacher", teacher_feature)):
        if f.ndim not in (3, 4):
            raise ShapeMismatchError(
                f"at: the {name} feature has shape {tuple(f.shape)}; attention transfer needs "
                "spatial features (maps (B, C, H, W) or tokens (B, N, D)), not vectors"
            )
    _same_batch("at", student_feature, teacher_feature)
    s, t = _wide(student_feature, teacher_feature)
    s, t = pool_to_common(as_map(s), as_map(t))
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


# ---------------------------------------------------------------------------- SP
def sp(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    r"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge
    Distillation", ICCV 2019).

    .. math:: G = \mathrm{rownorm}(F F^\top),\quad
              \mathcal{L} = \frac{1}{B^2}\lVert G_t - G_s\rVert_F^2

    with :math:`F` the ``(B, ·)`` flattened features and each row of the Gram matrix
    L2-normalised. Student and teacher widths may differ.
    """
    _same_batch("sp", student_feature, teacher_feature)
    s, t = _wide(student_feature.flatten(1), teacher_feature.flatten(1))
    g_s = F.normalize(s @ s.t(), p=2, dim=1)
    g_t = F.normalize(t @ t.t(), p=2, dim=1)
    b = s.shape[0]
    return (g_t - g_s).pow(2).sum() / (b * b)


# ---------------------------------------------------------------------------- RKD
def _pdist(e: torch.Tensor, eps: float) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1.0 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device))


def _normalized_distances(e: torch.Tensor, eps: float) -> torch.Tensor:
    d = _pdist(e, eps)
    mean = d.sum() / (d > 0).sum().clamp_min(1)  # mean over the positive (off-diagonal) entries
    return d / mean.clamp_min(eps)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """Cosines ``[i, j, k]`` between ``e_j - e_i`` and ``e_k - e_i`` (0 where either vanishes),
    flattened. Through the Gram matrix, ``(e_j - e_i)·(e_k - e_i) = G_jk - G_ij - G_ik + G_ii``:
    ``O(B²D + B³)`` work instead of the ``O(B³D)`` of one difference vector per triplet. The
    Gram products are taken in float64 on centred embeddings, against cancellation."""
    e = e - e.mean(dim=0, keepdim=True)  # (B, D); angles do not move with a translation
    wide = e.double()
    g = wide @ wide.t()  # (B, B)
    num = g[None, :, :] - g[:, :, None] - g[:, None, :] + g.diagonal()[:, None, None]
    # norms of the differences computed directly, so that equal embeddings give exactly 0
    dist = torch.cdist(e[None], e[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    inv = torch.where(dist > 0, 1.0 / dist.clamp_min(1e-12), torch.zeros_like(dist))  # (B, B)
    return (num.to(e.dtype) * inv[:, :, None] * inv[:, None, :]).flatten()  # (B³,)


def rkd(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    r"""Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019):
    distance-wise plus angle-wise potentials.

    .. math:: \psi_D(i,j) = \frac{\lVert e_i - e_j\rVert}{\mu},\quad
              \mu = \mathrm{mean}_{i\ne j}\lVert e_i - e_j\rVert,\qquad
              \psi_A(i,j,k) = \Big\langle \frac{e_j - e_i}{\lVert e_j - e_i\rVert},
              \frac{e_k - e_i}{\lVert e_k - e_i\rVert}\Big\rangle

    .. math:: \mathcal{L} = w_D\,\ell_\delta(\psi_D^s, \psi_D^t)
              + w_A\,\ell_\delta(\psi_A^s, \psi_A^t)

    with :math:`\ell_\delta` the Huber (smooth-L1, :math:`\delta=1`) loss averaged over all
    :math:`B^2` pairs and :math:`B^3` triplets, and :math:`w_D = 25`, :math:`w_A = 50` as in
    the authors' code. Embeddings are flattened; the teacher side carries no gradient. Both
    terms are invariant to rotation and translation of either embedding, and to its
    scaling. A zero weight skips its term.
    """
    _same_batch("rkd", student_emb, teacher_emb)
    s, t = _wide(student_emb.flatten(1), teacher_emb.flatten(1).detach())
    loss = s.new_zeros(())
    if distance_weight:
        d_s, d_t = _normalized_distances(s, eps), _normalized_distances(t, eps)
        loss = loss + distance_weight * F.smooth_l1_loss(d_s, d_t)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


# ---------------------------------------------------------------------------- PKT
def pkt(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations
    with Probabilistic Knowledge Transfer", ECCV 2018), cosine-similarity kernel.

    .. math:: K_{ij} = \tfrac12\big(1 + \cos(f_i, f_j)\big),\quad
              p_{j|i} = \frac{K_{ij}}{\sum_k K_{ik}},\quad
              \mathcal{L} = \frac{1}{B^2}\sum_{i,j} p^t_{j|i}
              \log\frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}

    over the ``(B, ·)`` flattened features (each divided by its norm plus
    :math:`\epsilon = 10^{-7}`), as in the authors' code. Invariant to positive scaling of
    either feature (up to :math:`\epsilon`).
    """
    _same_batch("pkt", student_feature, teacher_feature)
    s, t = _wide(student_feature.flatten(1), teacher_feature.flatten(1))

    def conditional(x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(s), conditional(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ---------------------------------------------------------------------------- VID
def vid(
    pred_mean: torch.Tensor,
    teacher_feature: torch.Tensor,
    log_scale: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Variational information distillation (Ahn et al., "Variational Information
    Distillation for Knowledge Transfer", CVPR 2019): negative log-likelihood of the teacher
    feature under a heteroscedastic Gaussian whose mean :math:`\mu(s)` the student predicts
    (the caller's regressor) and whose per-channel variance is learned.

    .. math:: \sigma_c^2 = \mathrm{softplus}(\alpha_c) + \epsilon,\qquad
              \mathcal{L} = \frac{1}{n}\sum_{b,c,\dots} \frac12\Big(
              \frac{(\mu_{b,c,\dots} - t_{b,c,\dots})^2}{\sigma_c^2} + \log\sigma_c^2\Big)

    (the constant :math:`\tfrac12\log 2\pi` dropped), averaged over every element as in the
    authors' code. ``log_scale`` is :math:`\alpha`, one entry per channel: dimension 1 of a
    map ``(B, C, H, W)``, the last dimension of vectors and tokens.
    """
    _same_shape("vid", pred_mean, teacher_feature)
    channels = pred_mean.shape[1] if pred_mean.ndim == 4 else pred_mean.shape[-1]
    if log_scale.shape != (channels,):
        raise ShapeMismatchError(
            f"vid: log_scale has shape {tuple(log_scale.shape)}, expected ({channels},): one "
            "entry per teacher channel"
        )
    mu, t, alpha = _wide(pred_mean, teacher_feature, log_scale)
    var = F.softplus(alpha) + eps
    if mu.ndim == 4:
        var = var.view(1, -1, 1, 1)
    return (0.5 * ((mu - t).pow(2) / var + torch.log(var))).mean()


# ---------------------------------------------------------------------------- CRD
def crd_normalizer(
    anchor: torch.Tensor, keys: torch.Tensor, num_data: int, temperature: float = 0.07
) -> torch.Tensor:
    r"""CRD's normalising constant :math:`Z = N\cdot\mathrm{mean}\,\exp(k^\top a/\tau)`
    estimated on one batch (the authors' code sets it once, on the first batch, and keeps
    it). ``anchor`` is ``(B, D)``, ``keys`` ``(B, K+1, D)``; the result carries no gradient."""
    with torch.no_grad():
        a, k = _wide(anchor, keys)
        scores = torch.exp(torch.bmm(k, a.unsqueeze(-1)).squeeze(-1) / temperature)
        return scores.mean() * num_data


def crd_nce(
    anchor: torch.Tensor,
    keys: torch.Tensor,
    num_data: int,
    temperature: float = 0.07,
    normalizer: torch.Tensor | float | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    r"""Contrastive representation distillation NCE loss (Tian et al., "Contrastive
    Representation Distillation", ICLR 2020, Eq. 18), one direction.

    ``anchor`` ``(B, D)`` holds L2-normalised embeddings of one network, ``keys``
    ``(B, K+1, D)`` memory embeddings of the other, the positive (same sample) first and
    ``K`` negatives after it. With :math:`P = \exp(k^\top a/\tau)/Z` and the uniform noise
    :math:`P_n = 1/N` over the :math:`N` = ``num_data`` training samples:

    .. math:: \mathcal{L} = -\frac1B\sum_b\Big[\log\frac{P_{b,0}}{P_{b,0} + K P_n + \epsilon}
              + \sum_{k=1}^{K}\log\frac{K P_n}{P_{b,k} + K P_n + \epsilon}\Big]

    ``normalizer`` is :math:`Z` (see :func:`crd_normalizer`; computed from this batch when
    ``None``). CRD's loss is this for the student anchored on teacher memory plus this for
    the teacher anchored on student memory; :math:`\tau = 0.07` as in the authors' code.
    """
    if anchor.ndim != 2 or keys.ndim != 3 or keys.shape[0] != anchor.shape[0]:
        raise ShapeMismatchError(
            f"crd_nce: anchor {tuple(anchor.shape)} must be (B, D) and keys "
            f"{tuple(keys.shape)} (B, K+1, D)"
        )
    if keys.shape[-1] != anchor.shape[-1] or keys.shape[1] < 2:
        raise ShapeMismatchError(
            f"crd_nce: keys {tuple(keys.shape)} must hold a positive and at least one negative "
            f"of the anchor's dimension {anchor.shape[-1]}"
        )
    a, k = _wide(anchor, keys)
    if normalizer is None:
        normalizer = crd_normalizer(a, k, num_data, temperature)
    return _crd_nce_from_dots(
        torch.bmm(k, a.unsqueeze(-1)).squeeze(-1), num_data, temperature, normalizer, eps
    )


def crd_nce_bank(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    index: torch.Tensor,
    num_data: int,
    temperature: float = 0.07,
    normalizer: torch.Tensor | float | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """:func:`crd_nce` with ``keys = memory[index]`` (``memory`` ``(N, D)``, ``index``
    ``(B, K+1)``, positive first), without materialising the ``(B, K+1, D)`` keys when
    scoring the anchor against the whole bank is cheaper (many negatives for a small bank).
    Same value and gradient as ``crd_nce(anchor, memory[index], ...)``."""
    if memory.ndim != 2 or index.ndim != 2 or index.shape[0] != anchor.shape[0]:
        raise ShapeMismatchError(
            f"crd_nce_bank: memory {tuple(memory.shape)} must be (N, D) and index "
            f"{tuple(index.shape)} (B, K+1) for an anchor of {tuple(anchor.shape)}"
        )
    if index.shape[1] < 2 * memory.shape[0] // anchor.shape[0]:
        return crd_nce(anchor, memory[index], num_data, temperature, normalizer, eps)
    a, m = _wide(anchor, memory)
    m = m.clone()  # cheaper than the gathered keys; the caller may update its bank in place
    if normalizer is None:
        normalizer = crd_normalizer(a, m[index], num_data, temperature)
    dots = (a @ m.T).gather(1, index)
    return _crd_nce_from_dots(dots, num_data, temperature, normalizer, eps)


def _crd_nce_from_dots(dots, num_data, temperature, normalizer, eps):
    p = torch.exp(dots / temperature) / normalizer
    noise = (dots.shape[1] - 1) / float(num_data)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / dots.shape[0]


def info_nce(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    r"""In-batch contrastive loss (InfoNCE), CRD's objective without a memory bank: each
    sample's other-network embedding is its positive and the rest of the batch its
    negatives, in both directions (as CRD sums its student- and teacher-anchored halves).

    .. math:: \mathcal{L} = \mathrm{CE}\big(S T^\top/\tau, \mathrm{diag}\big)
              + \mathrm{CE}\big(T S^\top/\tau, \mathrm{diag}\big)

    with ``(B, D)`` embeddings :math:`S, T` (L2-normalised by the caller) and
    :math:`\tau = 0.07`.
    """
    _same_shape("info_nce", student_emb, teacher_emb)
    s, t = _wide(student_emb, teacher_emb)
    logits = s @ t.t() / temperature
    labels = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


# ---------------------------------------------------------------------------- ReviewKD
def hcl(
    student_features: Sequence[torch.Tensor] | torch.Tensor,
    teacher_features: Sequence[torch.Tensor] | torch.Tensor,
    levels: Sequence[int] = (4, 2, 1),
) -> torch.Tensor:
    r"""Hierarchical context loss of ReviewKD (Chen et al., "Distilling Knowledge via
    Knowledge Review", CVPR 2021), summed over feature pairs.

    For maps :math:`F_s, F_t` of size :math:`h\times w` and each pooling level
    :math:`l \in (4, 2, 1)` smaller than the map (:math:`l < \min(h, w)`), with weights
    :math:`1, \tfrac12, \tfrac14, \dots` for the full map and the successive levels:

    .. math:: \mathcal{L} = \sum_{\text{pairs}} \frac{\mathrm{MSE}(F_s, F_t)
              + \sum_{i} 2^{-i}\,\mathrm{MSE}\big(P_{l_i}(F_s), P_{l_i}(F_t)\big)}
              {1 + \sum_i 2^{-i}}

    with :math:`P_l` adaptive average pooling to :math:`l\times l`, as in the authors' code.
    Features are viewed as maps (:func:`as_map`).
    """
    if isinstance(student_features, torch.Tensor):
        student_features = [student_features]
    if isinstance(teacher_features, torch.Tensor):
        teacher_features = [teacher_features]
    if len(student_features) != len(teacher_features) or not student_features:
        raise ShapeMismatchError(
            f"hcl: {len(student_features)} student and {len(teacher_features)} teacher "
            "features; pass one teacher feature per student feature"
        )
    total = None
    for fs, ft in zip(student_features, teacher_features, strict=True):
        s, t = _wide(as_map(fs), as_map(ft))
        _same_shape("hcl", s, t)
        loss, weight, norm = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= min(s.shape[2], s.shape[3]):
                continue
            weight /= 2.0
            pooled = F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level)
            loss = loss + weight * F.mse_loss(*pooled)
            norm += weight
        total = loss / norm if total is None else total + loss / norm
    return total


# ---------------------------------------------------------------------------- PKD
def _standardize_rows(x: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """Each column of ``x`` ``(N, D)`` standardised over its kept rows (others set to 0)."""
    w = keep.to(x.dtype)[:, None]
    count = w.sum()
    mean = (x * w).sum(dim=0, keepdim=True) / count.clamp_min(1.0)
    correction = (count > 1).to(x.dtype)
    var = ((x - mean).pow(2) * w).sum(dim=0, keepdim=True) / (count - correction).clamp_min(1.0)
    return (x - mean) / (var.clamp_min(1e-24).sqrt() + eps) * w  # (no 0 * inf at var 0)


def _standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    dim = 1 if x.ndim == 4 else x.ndim - 1
    x = x.movedim(dim, 0)
    flat = x.reshape(x.shape[0], -1)
    correction = 1 if flat.shape[1] > 1 else 0
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, keepdim=True, correction=correction)
    std = var.clamp_min(1e-24).sqrt()  # a constant channel: a zero gradient, not 0 * inf
    return ((flat - mean) / (std + eps)).reshape(x.shape).movedim(0, dim)


def pkd(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Pearson-correlation feature KD (Cao et al., "PKD: General Distillation Framework for
    Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022).

    Each channel is standardised over the batch and every position,
    :math:`\hat F_c = (F_c - \mu_c)/(\sigma_c + \epsilon)` (:math:`\sigma` the unbiased
    standard deviation, :math:`\epsilon = 10^{-6}`), then

    .. math:: \mathcal{L} = \tfrac12\,\mathrm{MSE}(\hat F_s, \hat F_t)

    as in the authors' code (mmrazor ``PKDLoss``); per channel this equals
    :math:`1 - r` with :math:`r` the Pearson correlation (up to the :math:`(n-1)/n` factor
    of the unbiased deviation), so the loss is invariant to a positive affine change of any
    channel of either feature. Channels are dimension 1 of maps, the last dimension of
    vectors and tokens; both features must have the same shape. With ``mask`` (token
    features), the statistics and the error are taken over the counted positions only.
    """
    _same_shape("pkd", student_feature, teacher_feature)
    s, t = _wide(student_feature, teacher_feature)
    if mask is None:
        return F.mse_loss(_standardize(s, eps), _standardize(t, eps)) / 2.0
    keep = position_mask("pkd", mask, s)
    s, t = s.reshape(keep.shape[0], -1), t.reshape(keep.shape[0], -1)
    error = (_standardize_rows(s, keep, eps) - _standardize_rows(t, keep, eps)).pow(2)
    return masked_mean(error.mean(dim=1), keep) / 2.0

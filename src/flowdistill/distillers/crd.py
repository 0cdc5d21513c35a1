"""Tian et al., "Contrastive Representation Distillation" (ICLR 2020)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from .._values import check_index_range
from ..errors import ConfigError
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["CRD"]

_MODES = ("memory", "batch")
_NEGATIVES = ("class", "uniform")


class _Embed(nn.Module):
    """CRD's embedding head: flatten, linear, L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), p=2, dim=1)


@register("crd")
class CRD(FeatureDistiller):
    """CRD (Tian et al., ICLR 2020): contrastive NCE between student and teacher embeddings.

    Linear heads embed the student and teacher features (flattened) into ``feat_dim = 128``
    L2-normalised dimensions. With ``mode="memory"`` (the paper's), a memory bank holds a
    momentum-updated (``nce_m = 0.5``) embedding of every training sample for each network,
    keyed by dataset index (``batch_index``, set by the engine); each sample is contrasted
    with its own memory entry against ``nce_k = 16384`` negatives (capped at the number of
    other training samples) through the NCE loss :func:`flowdistill.losses.crd_nce` at
    ``nce_t = 0.07``, in both directions (student anchor on teacher memory and teacher
    anchor on student memory); the normalising constant ``Z`` is estimated once on the
    first batch and kept, as in the authors' code. ``mode="batch"`` drops the memory bank
    and uses the in-batch InfoNCE :func:`flowdistill.losses.info_nce` (no dataset indices,
    no memory: for large data). Weight ``crd_weight = 0.8``, cross-entropy weight 1, as in
    RepDistiller. With ``negatives="class"`` (the default, as the authors' CIFAR loader
    does) each sample's negatives are drawn uniformly, with replacement, from the training
    samples of other classes (the engine passes the training labels to
    :meth:`on_fit_targets`); ``negatives="uniform"`` draws them from every other sample.
    """

    tune_grid = {"crd_weight": [0.4, 0.8], "kd_weight": [0.0, 1.0]}

    uses_indices = True
    max_pairs = 1

    def __init__(
        self,
        teacher,
        student,
        *,
        mode: str = "memory",
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        crd_weight: float = 0.8,
        negatives: str = "class",
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        if mode not in _MODES:
            raise ConfigError(f"crd: mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if negatives not in _NEGATIVES:
            raise ConfigError(
                f"crd: negatives must be one of {', '.join(_NEGATIVES)}, got {negatives!r}"
            )
        self.negatives = negatives
        if feat_dim < 1 or nce_k < 1:
            raise ConfigError(f"crd: feat_dim and nce_k must be positive, got {feat_dim}, {nce_k}")
        if nce_t <= 0 or not 0.0 <= nce_m < 1.0:
            raise ConfigError(f"crd: need nce_t > 0 and 0 <= nce_m < 1, got {nce_t}, {nce_m}")
        self.mode = mode
        self.uses_indices = mode == "memory"  # in-batch mode needs no dataset indices
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.nce_m = float(nce_m)
        self.crd_weight = float(crd_weight)
        (s_shape, t_shape) = self.pair_shapes[0]
        self.embed_s = _Embed(math.prod(s_shape), self.feat_dim)
        self.embed_t = _Embed(math.prod(t_shape), self.feat_dim)
        self.num_data = 0
        # sized by on_fit_start; None buffers are not part of the state dict until then
        self.register_buffer("memory_student", None)
        self.register_buffer("memory_teacher", None)
        self.register_buffer("normalizer", None)
        # negatives="class": the training samples ordered by class, and where each class's
        # run of them starts and how long it is (set by on_fit_targets; not saved)
        self.register_buffer("_by_class", None, persistent=False)
        self.register_buffer("_labels", None, persistent=False)
        self.register_buffer("_class_start", None, persistent=False)
        self.register_buffer("_class_count", None, persistent=False)
        # whether ``normalizer`` holds Z: known on the host, so that a step never reads the
        # buffer from the device; None after loading a state dict, read once then
        self._z_set: bool | None = False

    @property
    def num_negatives(self) -> int:
        """Negatives per positive: ``nce_k`` capped at the number of other samples."""
        return min(self.nce_k, self.num_data - 1)

    def on_fit_start(self, num_train_samples: int) -> None:
        """Size the memory bank (uniform in ±1/sqrt(feat_dim/3), as the authors' code)."""
        if self.mode != "memory":
            return
        if num_train_samples < 2:
            raise ConfigError(
                f"crd: the memory bank needs at least 2 training samples, got {num_train_samples}"
            )
        self.num_data = int(num_train_samples)
        device = self.embed_s.linear.weight.device
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        shape = (self.num_data, self.feat_dim)
        self.memory_student = torch.rand(shape, device=device).mul_(2 * stdv).sub_(stdv)
        self.memory_teacher = torch.rand(shape, device=device).mul_(2 * stdv).sub_(stdv)
        self.normalizer = torch.full((2,), -1.0, device=device)
        self._z_set = False

    def on_fit_targets(self, targets: torch.Tensor) -> None:
        """Index the training samples by class, for negatives of other classes."""
        if self.mode != "memory" or self.negatives != "class":
            return
        if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
            raise ConfigError(
                "crd: negatives='class' draws negatives from other classes and needs one "
                f"integer class label per training sample, got targets of shape "
                f"{tuple(targets.shape)} and dtype {targets.dtype}; use negatives='uniform'"
            )
        labels = targets.detach().long()
        if labels.numel() and int(labels.min()) < 0:
            raise ConfigError("crd: negatives='class' needs class labels >= 0")
        counts = torch.bincount(labels)
        if int(counts.max()) == labels.numel():
            raise ConfigError(
                "crd: negatives='class' needs training samples of at least two classes, "
                f"but all {labels.numel()} are of class {int(labels[0])}; use "
                "negatives='uniform'"
            )
        device = self.embed_s.linear.weight.device
        self._by_class = torch.argsort(labels, stable=True).to(device)
        self._labels = labels.to(device)
        self._class_count = counts.to(device)
        self._class_start = (torch.cumsum(counts, 0) - counts).to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint's memory sizes the bank when on_fit_start was not called first
        for name in ("memory_student", "memory_teacher", "normalizer"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key]))
                if name == "memory_student":
                    self.num_data = state_dict[key].shape[0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._z_set = None

    def _indices(self, batch: int) -> torch.Tensor:
        if self.memory_student is None:
            raise ConfigError(
                "crd: the memory bank is not sized; call on_fit_start(num_train_samples) "
                "before training (the engine does), or use mode='batch'"
            )
        idx = self.batch_index
        if idx is None:
            raise ConfigError(
                "crd: mode='memory' needs each sample's dataset index in distiller.batch_index "
                "(the engine sets it); set it in your own loop or use mode='batch'"
            )
        idx = idx.to(self.memory_student.device).long().flatten()
        if idx.numel() != batch:
            raise ConfigError(
                f"crd: batch_index holds {idx.numel()} indices for a batch of {batch} samples"
            )
        try:
            check_index_range(idx, self.num_data, "")
        except ValueError:
            raise ConfigError(
                f"crd: batch_index must lie in [0, {self.num_data}), the training set size "
                "given to on_fit_start"
            ) from None
        return idx

    def sample_keys(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, K+1)`` memory rows: each sample's own index, then ``K`` negatives drawn
        uniformly (with replacement) from the samples of other classes, or, with
        ``negatives="uniform"``, from every other sample."""
        shape = (idx.shape[0], self.num_negatives)
        if self.negatives == "uniform":
            neg = torch.randint(0, self.num_data - 1, shape, device=idx.device)
            neg = neg + (neg >= idx[:, None]).long()  # skip the positive's own index
            return torch.cat([idx[:, None], neg], dim=1)
        if self._by_class is None or self._by_class.numel() != self.num_data:
            raise ConfigError(
                "crd: negatives='class' needs the training labels; call "
                "on_fit_targets(train_targets) before training (the engine does), or use "
                "negatives='uniform'"
            )
        cls = self._labels[idx]
        start, count = self._class_start[cls, None], self._class_count[cls, None]
        # a position among the samples of other classes, in class order, skipping the run
        # of the positive's own class
        pos = (torch.rand(shape, device=idx.device) * (self.num_data - count)).long()
        pos = torch.minimum(pos, self.num_data - count - 1)  # (rounding at the top)
        pos = pos + (pos >= start).long() * count
        return torch.cat([idx[:, None], self._by_class[pos]], dim=1)

    @torch.no_grad()
    def update_memory(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Momentum update of the rows ``idx``: ``normalize(m·memory + (1 − m)·v)``."""
        for memory, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = memory.index_select(0, idx) * self.nce_m + v.detach().to(memory) * (
                1 - self.nce_m
            )
            memory.index_copy_(0, idx, F.normalize(rows, p=2, dim=1))

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_targets(targets)  # padded token targets refused before anything else
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        v_s, v_t = self.embed_s(s_feats[0]), self.embed_t(t_feats[0])
        if self.mode == "batch":
            loss = losses.info_nce(v_s, v_t, self.nce_t)
        else:
            idx = self._indices(v_s.shape[0])
            keys = self.sample_keys(idx)
            m_t, m_s, n = self.memory_teacher, self.memory_student, self.num_data
            if self._z_set is None:  # a loaded state: read once whether it holds Z
                self._z_set = bool(self.normalizer[0] >= 0)
            if not self._z_set:  # the authors' code: Z estimated on the first batch, kept
                self.normalizer[0] = losses.crd_normalizer(v_s, m_t[keys], n, self.nce_t)
                self.normalizer[1] = losses.crd_normalizer(v_t, m_s[keys], n, self.nce_t)
                self._z_set = True
            z_s, z_t = self.normalizer.clone().unbind()
            loss = losses.crd_nce_bank(v_s, m_t, keys, n, self.nce_t, z_s) + losses.crd_nce_bank(
                v_t, m_s, keys, n, self.nce_t, z_t
            )
            if self.training:
                self.update_memory(idx, v_s, v_t)
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["crd"] = self.crd_weight * loss
        return self.total(terms)

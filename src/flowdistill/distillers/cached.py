"""Teacher outputs computed once and reused: a top-k cache of the teacher's logits.

For language models the teacher's forward pass dominates a distillation step; its top-k
logits per position, written once to a file, serve every student after. The file records
fingerprints of the teacher's weights and of the inputs it was made from, and loading checks
them, so a cache never silently pairs with another teacher or other data.

>>> import torch
>>> from flowdistill.distillers.cached import build_topk_cache
>>> teacher = torch.nn.Sequential(torch.nn.Embedding(11, 11))
>>> x = torch.randint(0, 11, (6, 5))
>>> cache = build_topk_cache(teacher, x, k=3)
>>> cache.values.shape, cache.indices.shape
(torch.Size([6, 5, 3]), torch.Size([6, 5, 3]))
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.inputs import Inputs, call_model, check_inputs, move, num_rows, take
from ..engine.checkpoint import digest, load_checkpoint, save_checkpoint
from ..errors import CheckpointError, ConfigError, DataError
from ..taps import LOGITS, check_output, select_output
from .base import Distiller

__all__ = ["CachedKD", "TopKCache", "build_topk_cache", "sparse_kd"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _data_fingerprint(x: Inputs) -> str:
    """A digest of the inputs (of each entry of a dict of inputs, by name)."""
    if isinstance(x, Mapping):
        h = hashlib.sha256(b"inputs by name")
        for key in sorted(x):
            h.update(key.encode() + b"\0" + _data_fingerprint(x[key]).encode())
        return h.hexdigest()
    h = hashlib.sha256(str(tuple(x.shape)).encode() + str(x.dtype).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _teacher_fingerprint(teacher: nn.Module) -> str:
    return digest({k: v for k, v in teacher.state_dict().items()})


@dataclass
class TopKCache:
    """Top-``k`` teacher logits per position: ``values`` (the logits, in the cache dtype)
    and ``indices`` (their vocabulary ids), both ``(N, *positions, k)``, for the inputs
    whose fingerprint is ``data_fingerprint``."""

    values: torch.Tensor
    indices: torch.Tensor
    vocab_size: int
    teacher_fingerprint: str
    data_fingerprint: str

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def save(self, path: str | os.PathLike) -> None:
        save_checkpoint(
            path,
            {"values": self.values, "indices": self.indices},
            {
                "vocab_size": self.vocab_size,
                "teacher": self.teacher_fingerprint,
                "data": self.data_fingerprint,
            },
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        teacher: nn.Module | None = None,
        inputs: torch.Tensor | None = None,
    ) -> TopKCache:
        """Read a cache; with ``teacher``/``inputs`` given, check that it was made from them."""
        try:
            tensors, meta = load_checkpoint(path)
            cache = cls(tensors["values"], tensors["indices"], int(meta["vocab_size"]),
                        meta["teacher"], meta["data"])  # fmt: skip
        except KeyError as err:
            raise CheckpointError(f"{path} is not a teacher top-k cache (no {err})") from None
        if teacher is not None and _teacher_fingerprint(teacher) != cache.teacher_fingerprint:
            raise CheckpointError(
                f"{path} was made from another teacher (its weights differ); rebuild the cache"
            )
        if inputs is not None and _data_fingerprint(inputs) != cache.data_fingerprint:
            raise DataError(f"{path} was made from other inputs; rebuild the cache")
        return cache


@torch.no_grad()
def build_topk_cache(
    teacher: nn.Module,
    inputs: Inputs,
    k: int = 32,
    dtype: str = "float16",
    batch_size: int = 64,
    path: str | os.PathLike | None = None,
    output: int | str | None = None,
) -> TopKCache:
    """Run ``teacher`` over ``inputs`` once and keep its top-``k`` logits per position
    (values in ``dtype``; indices as int32); write the cache to ``path`` when given.
    ``inputs`` is a tensor or a dict of tensors (the teacher's keyword arguments).
    ``output`` picks the logits out of a teacher that returns several tensors (see
    :func:`flowdistill.taps.select_output`)."""
    check_output(output, "output")
    if dtype not in _DTYPES:
        raise ConfigError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for name, value in (("k", k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    inputs = check_inputs(inputs, "build_topk_cache: inputs")
    n = num_rows(inputs)
    if n == 0:
        raise DataError("build_topk_cache: inputs are empty; there is nothing to cache")
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    values, indices, vocab = [], [], None
    for i in range(0, n, batch_size):
        batch = move(take(inputs, slice(i, i + batch_size)), device)
        logits = select_output(call_model(teacher, batch), output).float()
        vocab = logits.shape[-1]
        if k > vocab:
            raise ConfigError(f"k = {k} exceeds the teacher's vocabulary of {vocab}")
        if not bool(torch.isfinite(logits).all()):
            teacher.train(was_training)
            raise DataError(
                f"build_topk_cache: the teacher's logits for inputs {i} to "
                f"{min(i + batch_size, n) - 1} are not finite (NaN or infinite): "
                "check the teacher's weights"
            )
        top = logits.topk(k, dim=-1)
        values.append(top.values.to(_DTYPES[dtype]).cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    teacher.train(was_training)
    cache = TopKCache(
        torch.cat(values), torch.cat(indices), int(vocab), _teacher_fingerprint(teacher),
        _data_fingerprint(inputs),
    )  # fmt: skip
    if path is not None:
        cache.save(path)
    return cache


def sparse_kd(
    student_logits: torch.Tensor,
    top_values: torch.Tensor,
    top_indices: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Forward KL from the teacher's top-``k`` distribution (softmax of the cached logits
    over their ``k`` ids, :math:`\hat p`) to the student's full distribution ``q`` at those
    ids: :math:`T^2 \sum_{i \in \mathrm{top}k} \hat p_i (\log \hat p_i - \log q_i)`, mean over
    the counted positions, in float32. With ``k`` = the vocabulary it is the forward KL."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = log_q.gather(-1, top_indices.long())  # (..., k)
    log_p = F.log_softmax(top_values.float() / temperature, dim=-1)
    per = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1.0) * temperature**2
    return per.mean() * temperature**2


class CachedKD(Distiller):
    """KD from a :class:`TopKCache` instead of a live teacher: no teacher forward pass.

    Rows of the cache are looked up by each batch's dataset indices (the engine sets
    ``batch_index``; data must be the cache's inputs, in order), so the training split must
    be the one the cache was built from. Loss: ``ce_weight`` x cross-entropy plus
    ``kd_weight`` x :func:`sparse_kd`; targets of -100 are left out.
    """

    masks_padding = True

    name = "cached_kd"
    uses_teacher = False
    uses_indices = True

    def __init__(
        self,
        cache: TopKCache,
        student: nn.Module,
        *,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        **base: Any,
    ) -> None:
        super().__init__(None, student, ce_weight=ce_weight, **base)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"cached_kd: temperature must be positive, got {temperature}")
        if not math.isfinite(kd_weight):
            raise ConfigError(f"cached_kd: kd_weight must be a finite number, got {kd_weight}")
        self.cache, self.temperature, self.kd_weight = cache, float(temperature), float(kd_weight)

    def on_fit_start(self, num_train_samples: int) -> None:
        if num_train_samples != len(self.cache.values):
            raise DataError(
                f"the cache holds {len(self.cache.values)} rows but the training split has "
                f"{num_train_samples}: it was made for other data"
            )

    def on_fit_data(self, inputs: torch.Tensor) -> None:
        if _data_fingerprint(inputs) != self.cache.data_fingerprint:
            raise DataError(
                "the cache was made from other training inputs than the ones given to fit "
                "(its rows would pair with the wrong samples); build it from this split"
            )

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.batch_index is None:
            raise ConfigError("cached_kd needs batch_index (the dataset rows of the batch)")
        s_logits = self.student_forward(inputs)[LOGITS]
        if s_logits.shape[-1] != self.cache.vocab_size:
            raise ConfigError(
                f"student vocabulary {s_logits.shape[-1]} differs from the cached teacher's "
                f"{self.cache.vocab_size}"
            )
        rows = self.batch_index.cpu()
        values = self.cache.values[rows].to(s_logits.device)
        indices = self.cache.indices[rows].to(s_logits.device)
        kd = sparse_kd(s_logits, values, indices, self.temperature, self.token_mask(targets))
        terms = {"kd": self.kd_weight * kd}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.cross_entropy(s_logits, targets)
        return self.total(terms)

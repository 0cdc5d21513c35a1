"""Datasets: the embedded digits data, IDX and ``.npz`` readers, seeded splits."""

from __future__ import annotations

from .datasets import Batches, Split, Splits, digits_splits, idx_splits, npz_splits, split
from .readers import read_idx, read_npz

__all__ = [
    "Batches",
    "Split",
    "Splits",
    "digits_splits",
    "idx_splits",
    "npz_splits",
    "read_idx",
    "read_npz",
    "split",
]

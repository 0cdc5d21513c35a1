"""Datasets: the embedded digits data; IDX, ``.npz``, CIFAR, image-folder and text
readers; seeded splits; augmentation."""

from __future__ import annotations

from .datasets import (
    Batches,
    Split,
    Splits,
    cifar_splits,
    digits_splits,
    idx_holdout_splits,
    idx_splits,
    npz_splits,
    random_crop_flip,
    split,
)
from .inputs import Inputs
from .readers import (
    read_chars,
    read_cifar,
    read_idx,
    read_idx_pair,
    read_image_folder,
    read_npz,
    read_text,
)
from .text import (
    CharTokenizer,
    char_splits,
    line_splits,
    packed_sequences,
    padded_sequences,
    token_windows,
)

__all__ = [
    "Batches",
    "CharTokenizer",
    "Split",
    "Splits",
    "char_splits",
    "cifar_splits",
    "digits_splits",
    "idx_holdout_splits",
    "idx_splits",
    "line_splits",
    "Inputs",
    "npz_splits",
    "packed_sequences",
    "padded_sequences",
    "random_crop_flip",
    "read_chars",
    "read_text",
    "read_cifar",
    "read_idx",
    "read_idx_pair",
    "read_image_folder",
    "read_npz",
    "split",
    "token_windows",
]

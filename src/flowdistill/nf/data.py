"""Discrete images for density modelling: integer pixels, seeded train/val/test splits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data.datasets import split
from ..data.readers import read_idx_pair
from ..errors import DataError

__all__ = ["ImageData", "digits_images", "mnist_test_images"]


@dataclass
class ImageData:
    """Integer images ``(N, C, H, W)`` (``uint8``, values in ``0 .. n_bins - 1``) in three
    splits, with the number of intensity levels ``n_bins``."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    n_bins: int

    def __post_init__(self) -> None:
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int) or self.n_bins < 2:
            raise DataError(f"ImageData.n_bins must be an integer >= 2, got {self.n_bins!r}")
        for name in ("train", "val", "test"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor) or not len(x):
                why = {"train": "nothing to train on", "val": "no epoch could be chosen",
                       "test": "nothing to report"}[name]  # fmt: skip
                raise DataError(f"ImageData.{name} is empty ({why})")
            if x.ndim != 4 or x.dtype != torch.uint8:
                raise DataError(f"ImageData.{name} must be uint8 (N, C, H, W), got {x.dtype} "
                                f"{tuple(x.shape)}")  # fmt: skip
            if len(x) and int(x.max()) >= self.n_bins:
                raise DataError(
                    f"ImageData.{name} holds the value {int(x.max())}, not below n_bins = "
                    f"{self.n_bins}"
                )
        shapes = {tuple(getattr(self, n).shape[1:]) for n in ("train", "val", "test")}
        if len(shapes) != 1:
            raise DataError(f"ImageData splits differ in image shape: {sorted(shapes)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


def _three_way(
    images: np.ndarray, labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[torch.Tensor, ...]:
    parts = split(images, labels, fractions, seed)  # stratified by class
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x, _ in parts)


def digits_images(seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)):
    """scikit-learn's 8x8 digits (1,797 images, 17 intensity levels ``0..16``), split
    60/20/20 (stratified, seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    train, val, test = _three_way(images, d.target, fractions, seed)
    return ImageData(train, val, test, n_bins=17)


def mnist_test_images(
    folder: str | os.PathLike,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    pad_to: int | None = None,
):
    """MNIST's official test files (``t10k-images-idx3-ubyte.gz`` and its labels; 10,000
    28x28 images, 256 levels), split into train/val/test (stratified, seeded): for setups
    where the training images are not at hand.  ``pad_to`` zero-pads to a square size
    (32 allows five squeezes)."""
    images, labels = read_idx_pair(
        os.path.join(folder, "t10k-images-idx3-ubyte.gz"),
        os.path.join(folder, "t10k-labels-idx1-ubyte.gz"),
    )
    images = images.astype(np.uint8)[:, None]
    if pad_to is not None:
        extra = pad_to - images.shape[-1]
        if extra < 0 or extra % 2:
            raise DataError(f"cannot pad {images.shape[-1]}-pixel images to {pad_to}")
        images = np.pad(images, ((0, 0), (0, 0), (extra // 2,) * 2, (extra // 2,) * 2))
    train, val, test = _three_way(images, labels, fractions, seed)
    return ImageData(train, val, test, n_bins=256)

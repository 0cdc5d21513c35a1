"""In-memory datasets with fixed, seeded train/validation/test splits and a batch iterator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DataError, ShapeMismatchError
from .inputs import Inputs, device_of, take, token_ids
from .readers import cached_npz, check_image_splits, read_idx, read_idx_pair, read_npz

__all__ = [
    "Batches",
    "Split",
    "Splits",
    "digits_splits",
    "idx_holdout_splits",
    "idx_splits",
    "npz_splits",
    "split",
]


@dataclass
class Split:
    """Inputs ``x`` and integer targets ``y``: class labels ``(N,)`` or token ids ``(N, T)``
    (-100 where a token is not counted). ``x`` is a tensor ``(N, ...)`` or a dict of such
    tensors that the model takes as keyword arguments (:mod:`flowdistill.data.inputs`)."""

    x: Inputs
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the inputs (of a dict's token ids, else its first entry)."""
        x = self.train.x
        if not isinstance(x, torch.Tensor):
            ids = token_ids(x)
            x = ids if ids is not None else next(iter(x.values()))
        return tuple(x.shape[1:])


def _bounds(fractions: tuple[float, ...], n: int) -> np.ndarray:
    """Where the parts of ``fractions`` of ``n`` samples end (rounded cumulative sizes)."""
    return np.round(np.cumsum(fractions) / sum(fractions) * n).astype(int)


def _per_class_need(fractions: tuple[float, ...]) -> int:
    """The fewest samples of one class that give every part of ``fractions`` one of them."""
    for n in range(1, 100_000):
        if np.all(np.diff(_bounds(fractions, n), prepend=0) > 0):
            return n
    return int(np.ceil(sum(fractions) / min(fractions))) + 1


def split(
    x: np.ndarray, y: np.ndarray, fractions: tuple[float, ...], seed: int, source: str = ""
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, seeded partition of ``(x, y)`` into parts of the given ``fractions``;
    a part left without samples raises DataError (naming ``source``, the data's file) that
    says how many samples each class needs."""
    prefix = f"{source}: " if source else ""
    if len(fractions) == 0 or min(fractions) <= 0:
        raise ConfigError(f"split: fractions must be positive numbers, got {fractions}")
    if len(y) == 0:
        raise DataError(f"{prefix}no samples to split")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    classes, counts = np.unique(y, return_counts=True)
    for label in classes:
        idx = rng.permutation(np.flatnonzero(y == label))
        bounds = _bounds(fractions, len(idx))
        for i, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
            parts[i].append(idx[lo:hi])
    empty = [f for f, chunks in zip(fractions, parts, strict=True) if not sum(map(len, chunks))]
    if empty:
        raise DataError(
            f"{prefix}too few samples for a stratified split into fractions {tuple(fractions)}: "
            f"{len(y)} samples in {len(classes)} classes (the smallest has {counts.min()}) leave "
            f"the part of fraction {empty[0]} empty; each class needs at least "
            f"{_per_class_need(tuple(fractions))} samples"
        )
    out = []
    for chunks in parts:
        order = rng.permutation(np.concatenate(chunks))
        out.append((x[order], y[order]))
    return out


def _standardize(parts: list[tuple[np.ndarray, np.ndarray]], channel_axis: int | None) -> Splits:
    """Tensors standardised with the *training* part's statistics."""
    x_train = parts[0][0]
    axes = tuple(i for i in range(x_train.ndim) if i != channel_axis)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-6
    made = [
        Split(
            torch.from_numpy(((x - mean) / std).astype(np.float32)),
            torch.from_numpy(y.astype(np.int64)),
        )
        for x, y in parts
    ]
    classes = int(max(int(y.max()) for _, y in parts)) + 1
    return Splits(*made, num_classes=classes)


def digits_splits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled 8×8 digits (1797 images), as ``(N, 1, 8, 8)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    train = 1.0 - val_fraction - test_fraction
    parts = split(x, data.target, (train, val_fraction, test_fraction), seed)
    return _standardize(parts, channel_axis=1)


def _images(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) → float (N, C, H, W) in [0, 1]."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"expected images of shape (N, H, W[, C]), got {x.shape}")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0


def _with_val(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    val_fraction: float,
    seed: int,
    source: str = "",
) -> Splits:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError(
            f"{source + ': ' if source else ''}images and labels differ in count: train "
            f"{len(x_train)} vs {len(y_train)}, test {len(x_test)} vs {len(y_test)}"
        )
    train, val = split(x_train, y_train, (1.0 - val_fraction, val_fraction), seed, source)
    return _standardize([train, val, (x_test, y_test)], channel_axis=1)


def _npz_pairs(path: str, d: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(x, y)`` pairs train, test (and ``x_val, y_val`` when present) of a ``.npz``,
    checked by :func:`~flowdistill.data.readers.check_image_splits`."""
    names = ["train", "test"] + (["val"] if "x_val" in d and "y_val" in d else [])
    return check_image_splits(
        [(f"x_{n}", d[f"x_{n}"], f"y_{n}", d[f"y_{n}"]) for n in names], str(path)
    )


def npz_splits(path: str, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """A ``.npz`` with ``x_train, y_train, x_test, y_test`` (images ``(N, H, W[, C])``,
    channels last; integer class labels); validation carved from train."""
    d = read_npz(path, keys=("x_train", "y_train", "x_test", "y_test"))
    (x_train, y_train), (x_test, y_test) = _npz_pairs(path, d)[:2]
    return _with_val(
        _images(x_train), y_train, _images(x_test), y_test, val_fraction, seed, str(path)
    )


def cifar_splits(folder: str, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """CIFAR-10/100 from the official python-pickle folder (see
    :func:`~flowdistill.data.readers.read_cifar`); validation carved from train, per-channel
    standardisation from the training split."""
    from .readers import read_cifar

    d = read_cifar(folder)
    to_float = lambda x: x.astype(np.float32) / 255.0  # noqa: E731  (already N, C, H, W)
    return _with_val(
        to_float(d["x_train"]), d["y_train"], to_float(d["x_test"]), d["y_test"],
        val_fraction, seed, str(folder),
    )  # fmt: skip


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch ``(N, C, H, W)``, on the batch's device:
    a random ``H×W`` crop of the zero-padded image and a horizontal flip with probability
    1/2, drawn per image. Vectorised (one gather), so GPU-resident data stays on the GPU."""
    if x.ndim != 4:
        raise ShapeMismatchError(f"random_crop_flip: expected (N, C, H, W), got {tuple(x.shape)}")
    n, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    gen_dev = generator.device if generator is not None else dev
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_dev).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_dev).to(dev)
    flip = torch.rand(n, generator=generator, device=gen_dev).to(dev) < 0.5
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))


def npz_subset_splits(
    path: str,
    train_size: int | None = None,
    val_size: int = 5000,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Splits:
    """A ``.npz`` (``x_train, y_train, x_test, y_test``) with a stratified, seeded validation
    split of ``val_size`` images carved from the training images and, optionally, a stratified
    training subset of ``train_size`` images from the rest; the full test split is kept."""
    d = cached_npz(path, ("x_train", "y_train", "x_test", "y_test"), cache_dir)
    (x, y), (x_test, y_test) = _npz_pairs(path, d)
    n = len(y)
    if val_size <= 0 or val_size >= n:
        raise DataError(f"val_size must be in (0, {n}), got {val_size}")
    rest = n - val_size
    size = rest if train_size is None else train_size
    if not 0 < size <= rest:
        raise DataError(f"train_size must be in (0, {rest}], got {train_size}")
    fractions = (size, val_size) if size == rest else (size, val_size, rest - size)
    parts = split(x, y, fractions, seed, str(path))
    train, val = parts[0], parts[1]
    return _standardize(
        [(_images(train[0]), train[1]), (_images(val[0]), val[1]), (_images(x_test), y_test)],
        channel_axis=1,
    )


def idx_splits(
    train_images: str,
    train_labels: str,
    test_images: str,
    test_labels: str,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """MNIST-style IDX files; validation carved from the training files."""
    (x_train, y_train), (x_test, y_test) = check_image_splits(
        [
            (str(train_images), read_idx(train_images), str(train_labels), read_idx(train_labels)),
            (str(test_images), read_idx(test_images), str(test_labels), read_idx(test_labels)),
        ]
    )
    return _with_val(
        _images(x_train), y_train, _images(x_test), y_test, val_fraction, seed, str(train_images)
    )


def idx_holdout_splits(
    images: str,
    labels: str,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> Splits:
    """One pair of IDX files (images and their labels) cut into train/validation/test parts
    of the given ``fractions`` (stratified, seeded): for a dataset of which only one official
    split is at hand, such as MNIST's test files alone. Standardised with the training
    part's statistics."""
    if len(fractions) != 3 or min(fractions) <= 0:
        raise DataError(f"fractions must be three positive numbers, got {fractions}")
    x, y = read_idx_pair(images, labels)
    parts = split(_images(x), y, fractions, seed, str(images))
    return _standardize(parts, channel_axis=1)


class Batches:
    """Mini-batches of a :class:`Split`; the shuffle order depends only on (seed, epoch).

    This makes a resumed run see exactly the batches an uninterrupted run would.

    With ``world > 1`` (data-parallel training) ``batch_size`` is the global batch: process
    ``rank`` gets the samples ``rank, rank + world, ...`` of each global batch, so that the
    processes together see exactly the batches of a single-process run; a last global batch
    smaller than ``world`` is dropped (smaller than ``min_share * world``: one that would
    give a process fewer than ``min_share`` samples, which BatchNorm cannot train on).
    """

    def __init__(
        self,
        data: Split,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
        min_share: int = 1,
    ) -> None:
        if not 0 <= rank < world:
            raise ConfigError(f"Batches: need 0 <= rank < world, got rank {rank}, world {world}")
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world, self.min_share = rank, world, max(1, int(min_share))
        self.epoch = 0
        #: dataset indices of the batch last yielded (for methods keyed by sample, e.g. CRD)
        self.last_index: torch.Tensor | None = None

    def __len__(self) -> int:
        n = len(self.data)
        full = n // self.batch_size
        if self.drop_last or n % self.batch_size < self.world * self.min_share:
            return full
        return full + 1

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order.to(device_of(self.data.x))  # (the same order wherever the data are)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            self.last_index = idx
            yield take(self.data.x, idx), self.data.y[idx]

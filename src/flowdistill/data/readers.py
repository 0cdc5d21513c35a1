"""Readers for local data files: IDX (MNIST-style), ``.npz`` archives, the official
CIFAR-10/100 python-pickle folders, ImageFolder-style trees and plain text (characters).

Every reader fails with :class:`~flowdistill.errors.DataError` naming the file and what is
wrong with it (missing, truncated, bad header, missing arrays); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "check_image_splits",
    "class_labels",
    "image_array",
    "read_chars",
    "read_cifar",
    "read_idx",
    "read_idx_pair",
    "read_image_folder",
    "read_npz",
    "read_text",
]

# IDX type codes → numpy dtypes (big-endian as stored)
_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _require(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian array.

    The header is two zero bytes, a type code, the number of dimensions ``n``, then ``n``
    big-endian uint32 sizes; the payload must hold exactly their product of items.
    """
    path = _require(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: truncated or corrupted gzip stream ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header needs {header} bytes, found {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: header {dims} needs {expected} bytes, found {len(raw)}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def read_idx_pair(
    images: str | os.PathLike, labels: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """An IDX image file ``(N, H, W)`` and its IDX label file ``(N,)``, checked to match."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{images} and {labels} do not pair: images {x.shape}, labels {y.shape} "
            "(expected (N, H, W) and (N,))"
        )
    return x, class_labels(y, str(labels))


def image_array(x: np.ndarray, name: str, source: str = "") -> np.ndarray:
    """``x`` checked to be non-empty numeric images ``(N, H, W)`` or ``(N, H, W, C)``
    (channels last); errors name ``source`` (the file) and ``name`` (the array)."""
    where = f"{source}: {name}" if source else name
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where} holds {x.dtype} values; images must be numeric (uint8 pixels)")
    if x.ndim not in (3, 4):
        flat = " (flattened images are not accepted: reshape them)" if x.ndim == 2 else ""
        raise DataError(
            f"{where} has shape {x.shape}; images must be (N, H, W) or (N, H, W, C){flat}"
        )
    if x.ndim == 4 and x.shape[1] in (1, 3, 4) and min(x.shape[2:]) > 4:
        raise DataError(
            f"{where} has shape {x.shape}, which looks channels-first (N, C, H, W); images "
            "must be channels-last (N, H, W, C): store x.transpose(0, 2, 3, 1)"
        )
    if len(x) == 0 or x.size == 0:
        raise DataError(f"{where} holds no images (shape {x.shape})")
    return x


def class_labels(y: np.ndarray, name: str, source: str = "") -> np.ndarray:
    """``y`` as int64 class indices ``(N,)``: ``(N, 1)`` is flattened; one-hot or other
    2-D labels, floats, strings and negative values raise DataError naming ``source`` and
    ``name``."""
    where = f"{source}: {name}" if source else name
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = (
            " (one-hot or multi-label rows are not accepted: store class indices, e.g. y.argmax(1))"
            if y.ndim == 2
            else ""
        )
        raise DataError(f"{where} has shape {y.shape}; class indices (N,) are expected{hint}")
    if y.dtype.kind in "US":
        raise DataError(
            f"{where} holds {y.dtype} values (strings); labels must be integer class indices "
            "0..C-1: map the names to indices first"
        )
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{where} holds {y.dtype} values; labels must be integer class indices 0..C-1 "
            "(store them as an integer array)"
        )
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{where} holds the negative label {int(y.min())}; classes are 0..C-1")
    return y.astype(np.int64)


def check_image_splits(
    pairs: list[tuple[str, np.ndarray, str, np.ndarray]], source: str = ""
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each ``(images name, images, labels name, labels)`` checked with :func:`image_array`
    and :func:`class_labels`, to pair up, to share the first (training) pair's image shape
    and to hold no class that the training labels lack; returns the ``(x, y)`` pairs with
    int64 labels. Errors name ``source`` (the file) and the arrays."""
    prefix = f"{source}: " if source else ""
    out = []
    for x_name, x, y_name, y in pairs:
        x, y = image_array(x, x_name, source), class_labels(y, y_name, source)
        if len(x) != len(y):
            raise DataError(
                f"{prefix}{x_name} and {y_name} differ in count: {len(x)} images, {len(y)} labels"
            )
        out.append((x, y))

    def image_shape(x: np.ndarray) -> tuple[int, ...]:
        return x.shape[1:] if x.ndim == 4 else (*x.shape[1:], 1)

    (train_name, _, y_train_name, _), (x_train, y_train) = pairs[0], out[0]
    seen = np.unique(y_train)
    for (x_name, _, y_name, _), (x, y) in zip(pairs[1:], out[1:], strict=True):
        if image_shape(x) != image_shape(x_train):
            raise DataError(
                f"{prefix}{train_name} has images {x_train.shape[1:]} but {x_name} has "
                f"{x.shape[1:]} (shapes {x_train.shape} and {x.shape}); every split must "
                "share one image size and channel count"
            )
        unseen = np.setdiff1d(np.unique(y), seen)
        if len(unseen):
            raise DataError(
                f"{prefix}{y_name} holds class(es) {unseen[:10].tolist()} that never occur in "
                f"{y_train_name} (its classes: {seen[:20].tolist()}); a model cannot learn them"
            )
    return out


def read_npz(path: str | os.PathLike, keys: tuple[str, ...] = ("x_train", "y_train")) -> dict:
    """Load the arrays of a ``.npz`` archive, checking that ``keys`` are present.

    The layout of the shared datasets is ``x_train``, ``y_train``, ``x_test``, ``y_test``
    (images ``(N, H, W, C)`` or ``(N, H, W)`` uint8, integer labels) and ``class_names``.
    """
    path = _require(path)
    if not zipfile.is_zipfile(path):  # (np.load would take it for a pickle)
        raise DataError(
            f"cannot read {path}: truncated or corrupted archive (not a readable .npz, which "
            "is a zip file)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {missing}; it has {sorted(archive.files)}")
            return {k: archive[k] for k in archive.files}
    except DataError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(
                f"{path} holds an object (pickled) array, which is not loaded for safety; "
                "store plain numeric arrays"
            ) from None
        raise DataError(f"cannot read {path}: truncated or corrupted archive ({err})") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise DataError(f"cannot read {path}: truncated or corrupted archive ({err})") from None


def cached_npz(
    path: str | os.PathLike,
    keys: tuple[str, ...] = ("x_train", "y_train"),
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """:func:`read_npz`, keeping the decoded arrays as plain ``.npy`` files in ``cache_dir``
    (keyed by the archive's name, size and modification time), so that a compressed
    archive is decompressed once rather than on every run."""
    path = _require(path)
    if cache_dir is None:
        return read_npz(path, keys)
    stat = os.stat(path)
    folder = Path(cache_dir) / f"{Path(path).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    files = {k: folder / f"{k}.npy" for k in keys}
    if all(f.is_file() for f in files.values()):
        try:
            return {k: np.load(f, allow_pickle=False) for k, f in files.items()}
        except (ValueError, OSError):
            pass  # a damaged cache is rebuilt below
    arrays = read_npz(path, keys)
    folder.mkdir(parents=True, exist_ok=True)
    for k in keys:
        tmp = folder / f".{k}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, arrays[k], allow_pickle=False)
        os.replace(tmp, files[k])
    return {k: arrays[k] for k in keys}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR batches (dicts of bytes, lists and numpy arrays) and
    refuses every other global, so a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a readable CIFAR batch (corrupt?): {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} lacks the CIFAR keys b'data' and {label_key!r}")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    except ValueError as err:  # ragged lists
        raise DataError(f"{path}: b'data' or {label_key!r} is not an array ({err})") from None
    if data.dtype != np.uint8:  # never wrap 256 to 0 or truncate floats silently
        numeric = data.size and data.dtype.kind in "biuf"
        if data.dtype.kind not in "iu" or (numeric and (data.min() < 0 or data.max() > 255)):
            found = f" values {data.min()}..{data.max()}" if numeric else ""
            raise DataError(
                f"{path}: b'data' holds {data.dtype}{found}; CIFAR pixels must be uint8 0..255"
            )
        data = data.astype(np.uint8)
    labels = class_labels(labels, repr(label_key), str(path))
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(
            f"{path}: {label_key!r} holds the label {int(labels.max())}, outside "
            f"0..{num_classes - 1} (CIFAR-{num_classes} has {num_classes} classes)"
        )
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(
            f"{path}: expected (N, 3072) pixels and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The official python version of CIFAR-10 (``cifar-10-batches-py``: ``data_batch_1..5``
    and ``test_batch``) or CIFAR-100 (``cifar-100-python``: ``train`` and ``test``, fine
    labels), as uint8 ``x_train`` (N, 3, 32, 32), int64 ``y_train``, ``x_test``, ``y_test``.
    The layout is recognised from the files present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"CIFAR folder not found: {folder}")
    if (folder / "train").is_file():  # cifar-100-python
        train_files, test_file, key = [folder / "train"], folder / "test", b"fine_labels"
        classes = 100
    else:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_file, key, classes = folder / "test_batch", b"labels", 10
    parts = [_cifar_batch(_require(p), key, classes) for p in train_files]
    x_test, y_test = _cifar_batch(_require(test_file), key, classes)
    return {
        "x_train": np.concatenate([x for x, _ in parts]),
        "y_train": np.concatenate([y for _, y in parts]),
        "x_test": x_test,
        "y_test": y_test,
    }


_IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
}


_IMAGE_MODES = ("L", "LA", "RGB", "RGBA")  # 8-bit modes, so the pixels fit uint8


def _class_images(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, sorted by their path relative to it;
    hidden files and folders (names starting with '.') are skipped."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symbolic link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            Path(top, f)
            for f in files
            if not f.startswith(".") and Path(f).suffix.lower() in _IMAGE_SUFFIXES
        ]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def read_image_folder(
    root: str | os.PathLike, size: tuple[int, int] | None = None, mode: str = "RGB"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder-style tree ``root/<class>/<image>``: uint8 images ``(N, H, W, C)``,
    int64 labels and the class names (sorted folder names; label ``k`` is ``classes[k]``).

    Images in subfolders of a class folder belong to that class (read recursively, sorted
    by relative path); hidden files and folders (``.ipynb_checkpoints``) are skipped, and a
    class folder without images is an error. Images are converted to ``mode`` (``L``,
    ``LA``, ``RGB`` or ``RGBA``) and, when ``size = (H, W)`` is given, resized (bilinear);
    without it every image must already have the same size."""
    from PIL import Image, UnidentifiedImageError

    if mode not in _IMAGE_MODES:
        raise ConfigError(f"read_image_folder: mode must be one of {_IMAGE_MODES}, got {mode!r}")
    if size is not None and not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
        and min(size) > 0
    ):
        raise ConfigError(
            f"read_image_folder: size must be a pair (H, W) of positive integers, got {size!r}"
        )
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} holds no class folders (expected root/<class>/<image>)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = _class_images(root / name)
        if not files:
            raise DataError(
                f"class folder {root / name} holds no images (suffixes "
                f"{', '.join(sorted(_IMAGE_SUFFIXES))}); remove it or add its images"
            )
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert(mode)
                    if size is not None:
                        im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except Image.DecompressionBombError as err:
                raise DataError(
                    f"cannot read image {path}: {err} (raise PIL.Image.MAX_IMAGE_PIXELS if "
                    "the file is trusted)"
                ) from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as err:
                raise DataError(f"cannot read image {path}: {err}") from None
            if images and arr.shape != images[0].shape:
                raise DataError(
                    f"{path} is {arr.shape[:2]} but earlier images are {images[0].shape[:2]}; "
                    "pass size=(H, W) to resize"
                )
            images.append(arr)
            labels.append(label)
    x = np.stack(images)
    return (x if x.ndim == 4 else x[..., None]), np.asarray(labels, dtype=np.int64), classes


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A plain-text file's text; a missing, empty or undecodable file is named, an unknown
    ``encoding`` is a ConfigError."""
    try:
        "".encode(encoding)  # (codecs.lookup would accept rot13, a str-to-str codec)
    except (LookupError, TypeError):
        raise ConfigError(
            f"unknown text encoding {encoding!r} (try 'utf-8' or 'latin-1')"
        ) from None
    path = _require(path)
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not {encoding} text: {err}") from None
    if not text:
        raise DataError(f"{path} is empty")
    return text


def read_chars(path: str | os.PathLike, encoding: str = "utf-8") -> tuple[np.ndarray, list[str]]:
    """A plain-text file as character ids (int64) and its sorted vocabulary: the text is
    ``"".join(vocab[i] for i in ids)``."""
    text = read_text(path, encoding)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text)), vocab

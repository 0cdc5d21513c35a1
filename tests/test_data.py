import gzip
import struct
import zipfile

import numpy as np
import pytest
import torch

from flowdistill.data import (
    Batches,
    Split,
    digits_splits,
    idx_splits,
    npz_splits,
    read_idx,
    read_npz,
)
from flowdistill.errors import DataError


def _write_idx(path, array, code=0x08):
    """Independent writer of the IDX format (header by hand with struct)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def test_digits_split_is_fixed_disjoint_and_stratified():
    a, b = digits_splits(seed=0), digits_splits(seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (1078, 360, 359)
    torch.testing.assert_close(a.test.x, b.test.x)
    rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in a.test.x.flatten(1))
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert abs(float(a.train.x.mean())) < 1e-4  # standardised with training statistics
    assert not torch.equal(digits_splits(seed=1).test.y, a.test.y)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([2, 0, 1], dtype=np.uint8)
    _write_idx(tmp_path / f"img{suffix}", images)
    _write_idx(tmp_path / f"lab{suffix}", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / f"img{suffix}"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"lab{suffix}"), labels)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    _write_idx(tmp_path / "f", floats, code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), floats)


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent")
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    _write_idx(tmp_path / "img", images)
    raw = (tmp_path / "img").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(DataError, match="truncated or corrupted"):
        read_idx(tmp_path / "broken.gz")


def test_idx_splits(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 10)):
        _write_idx(tmp_path / f"{name}-img", rng.integers(0, 256, (n, 6, 6), dtype=np.uint8))
        _write_idx(tmp_path / f"{name}-lab", np.arange(n, dtype=np.uint8) % 4)
    s = idx_splits(
        *(str(tmp_path / f) for f in ("train-img", "train-lab", "test-img", "test-lab")),
        val_fraction=0.2,
    )
    assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 10)
    assert s.input_shape == (1, 6, 6) and s.num_classes == 4


def test_npz_reader_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8),
        "y_train": np.arange(20) % 2,
        "x_test": rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8),
        "y_test": np.arange(6) % 2,
    }
    np.savez(tmp_path / "d.npz", **arrays)
    s = npz_splits(str(tmp_path / "d.npz"), val_fraction=0.2)
    assert s.input_shape == (3, 4, 4) and len(s.test) == 6 and len(s.train) + len(s.val) == 20
    # HWC → CHW: undo the per-channel standardisation of one test image and compare
    x = s.test.x.numpy()
    raw = arrays["x_test"].transpose(0, 3, 1, 2).astype(np.float32) / 255
    for c in range(3):
        slope, intercept = np.polyfit(raw[:, c].ravel(), x[:, c].ravel(), 1)
        np.testing.assert_allclose(raw[:, c] * slope + intercept, x[:, c], atol=1e-4)
    np.savez(tmp_path / "partial.npz", x_train=arrays["x_train"])
    with pytest.raises(DataError, match="lacks"):
        read_npz(tmp_path / "partial.npz", keys=("x_train", "y_train"))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupted"):
        read_npz(tmp_path / "trunc.npz")
    with pytest.raises(DataError, match="not found"):
        npz_splits(str(tmp_path / "absent.npz"))
    assert zipfile.is_zipfile(tmp_path / "d.npz")


def test_batches_order_depends_only_on_seed_and_epoch():
    split = Split(torch.arange(10.0)[:, None], torch.arange(10))
    a, b = Batches(split, 4, shuffle=True, seed=3), Batches(split, 4, shuffle=True, seed=3)
    a.epoch = b.epoch = 2
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
    assert len(a) == 3 and sorted(torch.cat([y for _, y in a]).tolist()) == list(range(10))
    b.epoch = 3
    assert [y.tolist() for _, y in a] != [y.tolist() for _, y in b]


def test_shared_mnist_test_images(shared_file):
    images = read_idx(shared_file("mnist", "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(shared_file("mnist", "t10k-labels-idx1-ubyte.gz"))
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(images.mean() / 255 - 0.1325) < 1e-3


def _tiny_npz(path, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    np.savez_compressed(
        path,
        x_train=rng.integers(0, 256, (n_train, 4, 4, 3), dtype=np.uint8),
        y_train=np.arange(n_train) % 3,
        x_test=rng.integers(0, 256, (n_test, 4, 4, 3), dtype=np.uint8),
        y_test=np.arange(n_test) % 3,
    )


def test_npz_subset_splits_sizes_strata_and_cache(tmp_path):
    from flowdistill.data.datasets import npz_subset_splits

    _tiny_npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    s = npz_subset_splits(str(tmp_path / "d.npz"), train_size=30, val_size=15, cache_dir=cache)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 15, 20)
    assert s.train.x.shape[1:] == (3, 4, 4) and s.num_classes == 3
    assert torch.bincount(s.train.y).tolist() == [10, 10, 10]  # stratified
    assert torch.bincount(s.val.y).tolist() == [5, 5, 5]
    cached = sorted(p.name for p in next(cache.iterdir()).iterdir())
    assert cached == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    again = npz_subset_splits(str(tmp_path / "d.npz"), train_size=30, val_size=15, cache_dir=cache)
    assert torch.equal(again.train.x, s.train.x) and torch.equal(again.val.y, s.val.y)
    # train and validation never share an image (the raw training images are all distinct)
    full = npz_subset_splits(str(tmp_path / "d.npz"), val_size=15)
    assert len(full.train) == 45
    rows = {tuple(r.tolist()) for r in full.train.x.flatten(1)}
    assert not rows & {tuple(r.tolist()) for r in full.val.x.flatten(1)}
    with pytest.raises(DataError, match="train_size"):
        npz_subset_splits(str(tmp_path / "d.npz"), train_size=50, val_size=15)
    with pytest.raises(DataError, match="absent|not found|no such"):
        npz_subset_splits(str(tmp_path / "missing.npz"))


def test_cifar10_cpu_suite_names_its_missing_file(tmp_path, monkeypatch):
    from flowdistill.bench.suites import get_suite

    monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar10.npz"):
        get_suite("cifar10-cpu").load_data()

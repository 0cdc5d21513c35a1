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
    idx_holdout_splits,
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


def test_idx_holdout_splits_cut_one_file_pair_three_ways(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 5, 5), dtype=np.uint8)
    images[:, 0, 0] = np.arange(50) * 5  # each image's first pixel names it
    labels = rng.permutation(np.arange(50, dtype=np.uint8) % 5)
    _write_idx(tmp_path / "img.gz", images)
    _write_idx(tmp_path / "lab.gz", labels)
    s = idx_holdout_splits(str(tmp_path / "img.gz"), str(tmp_path / "lab.gz"), (0.6, 0.2, 0.2))
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    assert s.input_shape == (1, 5, 5) and s.num_classes == 5
    assert torch.bincount(s.val.y).tolist() == [2] * 5  # stratified
    # one affine map (the training part's standardisation) for every part: read it off the
    # first pixel, which runs 0, 5, ..., 245 over the images
    parts = (s.train, s.val, s.test)
    first = torch.cat([p.x[:, 0, 0, 0] for p in parts]).double()
    lo, hi = first.min(), first.max()
    seen = []
    for part in parts:
        raw = (part.x.double() - lo) / (hi - lo) * 245  # back to 0..255 pixels
        index = (raw[:, 0, 0, 0] / 5).round().long()
        expected = torch.from_numpy(images[index.numpy()]).double()
        torch.testing.assert_close(raw[:, 0], expected, atol=1e-3, rtol=0)  # float32 storage
        assert torch.equal(part.y, torch.from_numpy(labels[index.numpy()]).long())
        seen += index.tolist()
    assert sorted(seen) == list(range(50))  # every image in exactly one part
    assert abs(float(s.train.x.mean())) < 1e-5  # standardised on the training part
    assert abs(float(s.train.x.std(unbiased=False)) - 1) < 1e-4
    again = idx_holdout_splits(str(tmp_path / "img.gz"), str(tmp_path / "lab.gz"), (0.6, 0.2, 0.2))
    assert torch.equal(again.test.x, s.test.x)
    _write_idx(tmp_path / "short.gz", labels[:49])
    with pytest.raises(DataError, match="do not pair"):
        idx_holdout_splits(str(tmp_path / "img.gz"), str(tmp_path / "short.gz"))
    with pytest.raises(DataError, match="fractions"):
        idx_holdout_splits(str(tmp_path / "img.gz"), str(tmp_path / "lab.gz"), (0.8, 0.2, 0.0))


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


def test_mnist_cpu_suite_names_its_missing_files(tmp_path, monkeypatch):
    from flowdistill.bench.suites import get_suite

    monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz and .*t10k-labels"):
        get_suite("mnist-cpu").load_data()


def test_mnist_cpu_suite_on_the_shared_files(shared_file):
    from flowdistill.bench.suites import get_suite

    shared_file("mnist", "t10k-images-idx3-ubyte.gz")
    labels = read_idx(shared_file("mnist", "t10k-labels-idx1-ubyte.gz"))
    s = get_suite("mnist-cpu").load_data()
    assert (len(s.train), len(s.val), len(s.test)) == (5999, 2001, 2000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    counts = sum(torch.bincount(p.y, minlength=10) for p in (s.train, s.val, s.test))
    assert counts.tolist() == np.bincount(labels).tolist()


def test_cifar10_cpu_suite_names_its_missing_file(tmp_path, monkeypatch):
    from flowdistill.bench.suites import get_suite

    monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar10.npz"):
        get_suite("cifar10-cpu").load_data()


# ---------------------------------------------------------------------------- CIFAR pickles
def _write_cifar(folder, n_per_batch, hundred=False, seed=0):
    """Tiny files in the official layout: uint8 pixels (N, 3072) channel-major, labels."""
    import pickle

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    key = b"fine_labels" if hundred else b"labels"
    names = (
        ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    )
    written = {}
    for name in names:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100 if hundred else 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", key: labels, b"data": data}, f, protocol=2)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("hundred", [False, True])
def test_read_cifar_official_layouts(tmp_path, hundred):
    from flowdistill.data import cifar_splits, read_cifar

    written = _write_cifar(tmp_path / "c", 6, hundred)
    d = read_cifar(tmp_path / "c")
    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    assert d["x_train"].shape == (6 * len(train_names), 3, 32, 32)
    data, labels = written[train_names[-1]]
    # channel-major rows: pixel (c, i, j) of image k is data[k, 1024 c + 32 i + j]
    k, c, i, j = 2, 1, 5, 30
    assert d["x_train"][-6 + k, c, i, j] == data[k, 1024 * c + 32 * i + j]
    assert d["y_train"][-6:].tolist() == labels
    test_name = "test" if hundred else "test_batch"
    assert d["y_test"].tolist() == written[test_name][1]
    if hundred:  # six images cannot be split across 100 classes
        return
    splits = cifar_splits(str(tmp_path / "c"), val_fraction=0.2, seed=0)
    assert len(splits.train) + len(splits.val) == len(d["y_train"])
    assert splits.input_shape == (3, 32, 32)


def test_read_cifar_errors_name_the_file(tmp_path):
    import pickle

    from flowdistill.data import read_cifar

    with pytest.raises(DataError, match="CIFAR folder not found"):
        read_cifar(tmp_path / "absent")
    _write_cifar(tmp_path / "c", 4)
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar(tmp_path / "c")
    _write_cifar(tmp_path / "c", 4)
    raw = (tmp_path / "c" / "test_batch").read_bytes()
    (tmp_path / "c" / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="test_batch"):
        read_cifar(tmp_path / "c")
    # a pickle that would call a function is refused, not run
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        read_cifar(tmp_path / "c")


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    from flowdistill.data import random_crop_flip

    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).reshape(2, 3, 6, 5) + 1
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):  # some crop offset and flip reproduce each image exactly
        windows = [
            w
            for dy in range(5)
            for dx in range(5)
            for w in (padded[n, :, dy : dy + 6, dx : dx + 5],)
            for w in (w, w.flip(-1))
        ]
        assert any(torch.equal(out[n], w) for w in windows)
    # over many draws both orientations and several offsets occur
    many = random_crop_flip(x[:1].expand(64, -1, -1, -1), 2, torch.Generator().manual_seed(1))
    assert len({tuple(m.flatten().tolist()) for m in many}) > 10


# ---------------------------------------------------------------------------- image folders, text
def test_read_image_folder(tmp_path):
    from PIL import Image

    from flowdistill.data import read_image_folder

    rng = np.random.default_rng(0)
    written = {}
    for cls in ("zebra", "ant"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(3):
            arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{k}.png")  # lossless
            written[(cls, k)] = arr
    (tmp_path / "imgs" / "ant" / "notes.txt").write_text("not an image")
    x, y, classes = read_image_folder(tmp_path / "imgs")
    assert classes == ["ant", "zebra"] and x.shape == (6, 5, 7, 3) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(x[4], written[("zebra", 1)])
    small, _, _ = read_image_folder(tmp_path / "imgs", size=(4, 4), mode="L")
    assert small.shape == (6, 4, 4, 1)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / "ant" / "9.png")
    with pytest.raises(DataError, match="pass size"):
        read_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "ant" / "9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="9.png"):
        read_image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="not found"):
        read_image_folder(tmp_path / "absent")


def test_read_chars_round_trips(tmp_path):
    from flowdistill.data import read_chars

    text = "To be, or not to be:\nthat is the question."
    (tmp_path / "t.txt").write_text(text)
    ids, vocab = read_chars(tmp_path / "t.txt")
    assert "".join(vocab[i] for i in ids) == text
    assert vocab == sorted(set(text)) and len(ids) == len(text)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_chars(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match="not utf-8"):
        read_chars(tmp_path / "b.txt")


def test_read_chars_tiny_shakespeare(shared_file):
    from flowdistill.data import read_chars

    ids, vocab = read_chars(shared_file("tinyshakespeare", "input.txt"))
    assert len(ids) == 1_115_394 and len(vocab) == 65  # the figures its README measured

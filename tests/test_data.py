import gzip
import re
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
    path = _npz(tmp_path / "d.npz", n_train=20, n_test=6, classes=2, size=4)
    arrays = dict(np.load(path))
    s = npz_splits(path, val_fraction=0.2)
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
    with pytest.raises(DataError, match="is a folder, not a data file"):
        read_chars(tmp_path)


def test_read_chars_tiny_shakespeare(shared_file):
    from flowdistill.data import read_chars

    ids, vocab = read_chars(shared_file("tinyshakespeare", "input.txt"))
    assert len(ids) == 1_115_394 and len(vocab) == 65  # the figures its README measured


# ---------------------------------------------------------------------------- malformed inputs
def _npz(path, n_train=30, n_test=9, classes=3, size=8, **arrays):
    """A ``.npz`` of the shared layout with small defaults (3 classes, 8×8 RGB images);
    ``arrays`` replace or add arrays."""
    rng = np.random.default_rng(0)
    d = {
        "x_train": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    np.savez(path, **{**d, **arrays})
    return str(path)


def test_image_folder_skips_hidden_reads_nested_and_refuses_empty_classes(tmp_path):
    from PIL import Image

    from flowdistill.data import read_image_folder

    def put(rel, value):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((3, 3), value, np.uint8)).save(tmp_path / rel)

    put("r/ant/a.png", 10)
    put("r/bee/c.png", 20)
    put("r/bee/sub/b.png", 30)  # nested: read, after c.png (sorted by relative path)
    put("r/bee/.hidden/z.png", 99)  # hidden folders and files are skipped
    put("r/bee/.z.png", 99)
    put("r/.ipynb_checkpoints/x.png", 99)  # not a class
    x, y, classes = read_image_folder(tmp_path / "r", mode="L")
    assert classes == ["ant", "bee"] and y.tolist() == [0, 1, 1]
    assert x[:, 0, 0, 0].tolist() == [10, 20, 30]
    (tmp_path / "r" / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cat holds no images"):
        read_image_folder(tmp_path / "r")
    (tmp_path / "r" / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*cat holds no images"):
        read_image_folder(tmp_path / "r")


def test_image_folder_argument_checks_and_decompression_bombs(tmp_path, monkeypatch):
    from PIL import Image

    from flowdistill.data import read_image_folder
    from flowdistill.errors import ConfigError

    (tmp_path / "r" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "r" / "a" / "big.png")
    for mode in ("I", "P", "rgb"):
        with pytest.raises(ConfigError, match=f"mode must be one of .*'{mode}'"):
            read_image_folder(tmp_path / "r", mode=mode)
    for size in ((0, 4), (4,), (4.0, 4), (-2, 3), "44", (True, 4)):
        with pytest.raises(ConfigError, match="size must be a pair"):
            read_image_folder(tmp_path / "r", size=size)
    assert read_image_folder(tmp_path / "r", size=[2, 3])[0].shape == (1, 2, 3, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 81 pixels > 2 × 10: a "bomb"
    with pytest.raises(DataError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        read_image_folder(tmp_path / "r")


def test_text_encoding_and_tokenizer_files(tmp_path):
    from flowdistill.data import CharTokenizer, read_chars, read_text
    from flowdistill.errors import ConfigError

    (tmp_path / "t.txt").write_text("abc")
    for encoding in ("no-such-codec", "rot13"):
        with pytest.raises(ConfigError, match=f"unknown text encoding '{encoding}'"):
            read_chars(tmp_path / "t.txt", encoding=encoding)
    with pytest.raises(ConfigError, match="unknown text encoding"):
        read_text(tmp_path / "t.txt", encoding="no-such-codec")
    assert read_text(tmp_path / "t.txt", encoding="latin-1") == "abc"
    tok = CharTokenizer.from_text("hello")
    tok.save(tmp_path / "ok.json")
    assert CharTokenizer.load(tmp_path / "ok.json").vocab == tok.vocab
    for name, content in (
        ("list.json", "[1, 2]"),
        ("number.json", '{"vocab": 5}'),
        ("nokey.json", '{"chars": ["a"]}'),
        ("long.json", '{"vocab": ["ab"]}'),
        ("ints.json", '{"vocab": [1, 2]}'),
        ("dup.json", '{"vocab": ["a", "a"]}'),
        ("broken.json", '{"vocab": ['),
    ):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=rf"{name} is not a saved CharTokenizer"):
            CharTokenizer.load(tmp_path / name)
    with pytest.raises(DataError, match="absent.json"):
        CharTokenizer.load(tmp_path / "absent.json")


@pytest.mark.parametrize("hundred", [False, True])
def test_read_cifar_refuses_labels_out_of_range(tmp_path, hundred):
    import pickle

    from flowdistill.data import read_cifar

    _write_cifar(tmp_path / "c", 4, hundred)
    name, key, bad = ("train", b"fine_labels", 100) if hundred else ("data_batch_2", b"labels", 10)
    data = np.zeros((4, 3072), np.uint8)
    for labels, shown in (([0, 1, bad, 2], bad), ([0, -1, 1, 2], -1)):
        with open(tmp_path / "c" / name, "wb") as f:
            pickle.dump({key: labels, b"data": data}, f, protocol=2)
        with pytest.raises(DataError, match=rf"{name}: {key!r} holds the .*label {shown}"):
            read_cifar(tmp_path / "c")
    for labels in ([0.0, 1.5, 2.0, 3.0], ["cat", "dog", "cat", "dog"]):  # floats, strings
        with open(tmp_path / "c" / name, "wb") as f:
            pickle.dump({key: labels, b"data": data}, f, protocol=2)
        with pytest.raises(DataError, match=rf"{name}: {key!r} holds .*integer class indices"):
            read_cifar(tmp_path / "c")


def test_read_cifar_refuses_pixels_that_are_not_uint8(tmp_path):
    import pickle

    from flowdistill.data import read_cifar

    _write_cifar(tmp_path / "c", 4)
    path = tmp_path / "c" / "test_batch"
    for data in (np.full((4, 3072), 300, np.int64), np.full((4, 3072), 0.5), -np.ones((4, 3072))):
        with open(path, "wb") as f:
            pickle.dump({b"labels": [0, 1, 2, 3], b"data": data}, f, protocol=2)
        with pytest.raises(DataError, match=r"test_batch: b'data' holds .*uint8 0\.\.255"):
            read_cifar(tmp_path / "c")
    in_range = np.arange(4 * 3072).reshape(4, 3072) % 256  # int64, every value fits uint8
    with open(path, "wb") as f:
        pickle.dump({b"labels": [0, 1, 2, 3], b"data": in_range}, f, protocol=2)
    d = read_cifar(tmp_path / "c")
    assert d["x_test"].dtype == np.uint8
    assert np.array_equal(d["x_test"].reshape(4, -1), in_range)


def test_npz_labels_must_be_class_indices(tmp_path):
    from flowdistill.data.datasets import npz_subset_splits

    y_train, y_test = np.arange(30) % 3, np.arange(9) % 3
    for y, problem in (
        (y_train.astype(np.float32), "float32 values; labels must be integer"),
        (np.eye(3, dtype=np.uint8)[y_train], r"shape \(30, 3\); class indices \(N,\).*one-hot"),
        (np.array(["a", "b", "c"] * 10), "strings"),
        (np.array([b"a", b"b", b"c"] * 10), "strings"),
        (y_train - 1, "negative label -1"),
    ):
        path = _npz(tmp_path / "d.npz", y_train=y)
        with pytest.raises(DataError, match=rf"{re.escape(path)}: y_train .*{problem}"):
            npz_splits(path)
        with pytest.raises(DataError, match=rf"{re.escape(path)}: y_train .*{problem}"):
            npz_subset_splits(path, val_size=6)
    # a class of the test (or validation) labels that training never shows
    path = _npz(tmp_path / "d.npz", y_test=np.where(y_test == 2, 5, y_test))
    with pytest.raises(DataError, match=r"d\.npz: y_test holds class\(es\) \[5\] that never"):
        npz_splits(path)
    path = _npz(tmp_path / "d.npz", x_val=np.zeros((2, 8, 8, 3), np.uint8), y_val=[0, 7])
    with pytest.raises(DataError, match=r"d\.npz: y_val holds class\(es\) \[7\]"):
        npz_splits(path)
    # (N, 1) columns are unambiguous: flattened
    path = _npz(tmp_path / "d.npz", y_train=y_train[:, None], y_test=y_test[:, None])
    s = npz_splits(path, val_fraction=0.2)
    assert s.train.y.shape == (24,) and s.test.y.tolist() == y_test.tolist()
    assert s.num_classes == 3


def test_idx_labels_must_be_integers(tmp_path):
    images = np.zeros((12, 5, 5), np.uint8)
    _write_idx(tmp_path / "img", images)
    _write_idx(tmp_path / "lab", np.arange(12, dtype=np.uint8) % 2)
    _write_idx(tmp_path / "flab", (np.arange(12) % 2).astype(np.float32), code=0x0D)
    files = [str(tmp_path / f) for f in ("img", "lab", "img", "flab")]
    with pytest.raises(DataError, match=r"flab holds float32 values; labels must be integer"):
        idx_splits(*files)
    with pytest.raises(DataError, match=r"flab holds float32 values"):
        idx_holdout_splits(files[0], files[3])
    _write_idx(tmp_path / "lab3", np.arange(12, dtype=np.uint8) % 3)
    with pytest.raises(DataError, match=r"lab3 holds class\(es\) \[2\] that never occur in .*lab"):
        idx_splits(*files[:3], str(tmp_path / "lab3"))


def test_npz_image_shapes_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    for x_test, shown in (
        (rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8), r"\(6, 6, 3\)"),
        (rng.integers(0, 256, (9, 8, 8), dtype=np.uint8), r"\(8, 8\)"),  # grayscale vs RGB
    ):
        path = _npz(tmp_path / "d.npz", x_test=x_test)
        with pytest.raises(
            DataError, match=rf"d\.npz: x_train has images \(8, 8, 3\) but x_test has {shown}"
        ):
            npz_splits(path)
    # (N, H, W) and (N, H, W, 1) are the same grayscale images
    gray = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    path = _npz(tmp_path / "d.npz", x_train=gray, x_test=gray[:9, :, :, None])
    assert npz_splits(path).input_shape == (1, 8, 8)
    path = _npz(tmp_path / "d.npz", x_train=gray.reshape(30, 64))
    with pytest.raises(
        DataError, match=r"d\.npz: x_train has shape \(30, 64\); images must be \(N, H, W\)"
    ):
        npz_splits(path)
    # channels-first images are refused, not transposed
    for c in (1, 3, 4):
        path = _npz(tmp_path / "d.npz", x_train=np.zeros((30, c, 8, 8), np.uint8))
        with pytest.raises(DataError, match=r"x_train has shape .*channels-first .*\(N, H, W, C\)"):
            npz_splits(path)


def test_npz_too_few_or_no_training_samples(tmp_path):
    from flowdistill.data import split
    from flowdistill.data.datasets import npz_subset_splits
    from flowdistill.errors import ConfigError

    path = _npz(tmp_path / "d.npz", x_train=np.zeros((0, 8, 8, 3), np.uint8), y_train=[])
    with pytest.raises(DataError, match=r"d\.npz: x_train holds no images"):
        npz_splits(path)
    with pytest.raises(DataError, match=r"d\.npz: x_train holds no images"):
        npz_subset_splits(path)
    path = _npz(tmp_path / "d.npz", x_train=np.zeros((3, 8, 8, 3), np.uint8), y_train=[0, 1, 2])
    with pytest.raises(DataError, match=r"d\.npz: too few samples .*needs at least 5 samples"):
        npz_splits(path, val_fraction=0.1)
    with pytest.raises(ConfigError, match="val_fraction"):
        npz_splits(_npz(tmp_path / "ok.npz"), val_fraction=0.0)
    with pytest.raises(ConfigError, match="fractions must be positive"):
        split(np.zeros(4), np.zeros(4), (1.0, 0.0), seed=0)

"""Tests for nncore.data: loaders, splits, preprocessing and errors, on tiny files written per test."""

import gzip
import importlib.util
import struct

import numpy as np
import pytest

from nncore import data
from nncore.data import DATASETS, Dataset, load_dataset, load_dataset_cached
from nncore.errors import DataError


def _ids_npz(path, counts, **extra):
    """An npz whose x holds each sample's index (so splits can be traced) and labels with the given counts."""
    y = np.repeat(np.arange(len(counts)), counts)
    x = np.arange(len(y), dtype=np.float64)[:, None] * np.ones((1, 3))
    np.savez(path, x=x, y=y, **extra)
    return f"npz:{path}"


def _ids(x):
    return set(x[:, 0].astype(int).tolist())


def _write_idx(path, magic, array, compress=False):
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _write_mnist(directory, n_train=30, n_test=6, rows=4, cols=5):
    rng = np.random.default_rng(1)
    for prefix, n, compress in (("train", n_train, True), ("t10k", n_test, False)):
        suffix = ".gz" if compress else ""
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", 2051,
                   rng.integers(0, 256, (n, rows, cols)), compress)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, np.arange(n) % 3, compress)


def _cifar_records(labels, rng):
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], pixels], axis=1)


def _write_cifar(directory, per_batch=6):
    rng = np.random.default_rng(2)
    for i in range(1, 6):
        _cifar_records(np.arange(per_batch) % 3, rng).tofile(directory / f"data_batch_{i}.bin")
    test = _cifar_records([2, 0, 1, 1], rng)
    test.tofile(directory / "test_batch.bin")
    return test


# --- built-in datasets -------------------------------------------------------------------------

def test_digits_shape_and_split_sizes():
    d = load_dataset("digits")
    assert d.input_shape == (64,) and d.num_classes == 10
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (1257, 270, 270)
    assert d.x_train.shape == (1257, 64)


def test_digits_raw_values_match_scikit_learn():
    from sklearn.datasets import load_digits

    d = load_dataset("digits", preprocess="none", val_fraction=0.01, test_fraction=0.0)
    ours = np.concatenate([d.x_train, d.x_val])
    theirs = load_digits().data
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, theirs.tolist()))


def test_digits_without_scikit_learn_is_a_data_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(DataError, match="digits: needs scikit-learn"):
        load_dataset("digits")


def test_spiral_is_stratified():
    d = load_dataset("spiral")
    assert d.input_shape == (2,) and d.num_classes == 3
    assert np.bincount(d.y_val).tolist() == [15, 15, 15]
    assert np.bincount(d.y_test).tolist() == [15, 15, 15]
    assert np.bincount(d.y_train).tolist() == [70, 70, 70]


def test_waves_shape():
    d = load_dataset("waves", test_fraction=0.0)
    assert d.input_shape == (1, 64) and d.num_classes == 4
    assert d.x_train.shape[1:] == (1, 64) and len(d.y_train) + len(d.y_val) == 1000
    assert d.x_test.shape == (0, 1, 64) and d.y_test.shape == (0,)


def test_generators_scale_the_built_in_tasks(tmp_path):
    """make_spiral / make_waves at their defaults are the built-ins; larger ones load through npz:PATH."""
    from nncore.data import make_spiral, make_waves

    x, y = make_spiral(per_class=400, classes=6)
    assert x.shape == (2400, 2) and np.bincount(y).tolist() == [400] * 6
    radius = np.hypot(x[:, 0], x[:, 1])
    assert radius.max() == pytest.approx(1.0) and radius.min() == 0.0
    # each arm runs from the centre outwards; arms differ (their angles start 4 radians apart)
    assert np.all(np.diff(radius[:400]) > 0) and np.allclose(radius[:400], radius[400:800])
    assert not np.allclose(x[:400], x[400:800])
    assert np.array_equal(make_spiral(per_class=400, classes=6)[0], x)  # fixed generator seed
    xw, yw = make_waves(per_class=30, length=32)
    assert xw.shape == (120, 1, 32) and np.bincount(yw).tolist() == [30] * 4
    np.savez(tmp_path / "big.npz", x=x, y=y)
    d = load_dataset(f"npz:{tmp_path / 'big.npz'}", val_fraction=0.3)
    assert d.num_classes == 6 and len(d.y_val) == 720
    builtin = load_dataset("spiral", preprocess="none")
    rows = lambda xs: sorted(map(tuple, xs.tolist()))
    assert rows(np.concatenate([builtin.x_train, builtin.x_val, builtin.x_test])) == rows(
        make_spiral()[0].astype(np.float32))


def test_shapes_are_noisy_16x16_images_of_four_balanced_classes():
    d = load_dataset("shapes", preprocess="none")
    assert d.input_shape == (1, 16, 16) and d.num_classes == 4 and d.classes is None
    y = np.concatenate([d.y_train, d.y_val, d.y_test])
    assert np.bincount(y).tolist() == [750] * 4
    assert d.x_train.dtype == np.float32 and 0.3 < float(np.std(d.x_train)) < 0.8


def test_shapes_generator_is_fixed_and_draws_outlines_anywhere():
    from nncore.data import make_shapes

    x, y = make_shapes()
    np.testing.assert_array_equal(make_shapes()[0], x)
    clean, y_clean = make_shapes(per_class=200, noise=0.0)
    assert clean.shape == (800, 1, 16, 16) and np.array_equal(y_clean, np.repeat(np.arange(4), 200))
    strokes = clean[:, 0] > 0
    pixels = strokes.sum(axis=(1, 2))
    assert pixels.min() >= 8  # every image shows its shape
    # outlines, not blobs: a circle or square of radius >= 3 leaves its centre empty
    rows, cols = np.nonzero(strokes[0])
    assert not strokes[0, int(round(rows.mean())), int(round(cols.mean()))]
    # circles are spread over the image: most pixels lie on some stroke, none on most of them
    coverage = strokes[:200].mean(axis=0)
    assert coverage.max() < 0.5 and (coverage > 0).mean() > 0.8
    # no pixel template separates the classes: a least-squares linear classifier on raw pixels stays weak
    flat = np.c_[x.reshape(len(x), -1), np.ones(len(x))]
    w = np.linalg.lstsq(flat[::2], np.eye(4)[y[::2]], rcond=None)[0]
    assert 0.3 < np.mean((flat[1::2] @ w).argmax(axis=1) == y[1::2]) < 0.7


def test_synthetic_data_does_not_depend_on_split_seed():
    a = load_dataset("waves", seed=1, preprocess="none")
    b = load_dataset("waves", seed=2, preprocess="none")
    rows = lambda d: sorted(map(tuple, np.concatenate([d.x_train, d.x_val, d.x_test])[:, 0].tolist()))
    assert rows(a) == rows(b)


# --- splits ------------------------------------------------------------------------------------

def test_splits_are_disjoint_and_cover_everything(tmp_path):
    d = load_dataset(_ids_npz(tmp_path / "a.npz", [40, 30, 30]), preprocess="none")
    train, val, test = _ids(d.x_train), _ids(d.x_val), _ids(d.x_test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(100))
    assert (len(train), len(val), len(test)) == (70, 15, 15)


def test_labels_follow_their_samples(tmp_path):
    name = _ids_npz(tmp_path / "a.npz", [40, 30, 30])
    d = load_dataset(name, preprocess="none")
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert np.array_equal(y, np.repeat(np.arange(3), [40, 30, 30])[x[:, 0].astype(int)])


def test_split_is_stratified_on_unbalanced_classes(tmp_path):
    counts = np.array([50, 30, 17, 3])
    d = load_dataset(_ids_npz(tmp_path / "a.npz", counts.tolist()), val_fraction=0.2, test_fraction=0.1,
                     preprocess="none")
    assert len(d.y_val) == 20 and len(d.y_test) == 10
    assert np.all(np.abs(np.bincount(d.y_val, minlength=4) - counts * 0.2) < 1)
    assert np.all(np.abs(np.bincount(d.y_test, minlength=4) - counts * 0.1) < 1)


def test_every_class_keeps_a_training_sample(tmp_path):
    d = load_dataset(_ids_npz(tmp_path / "a.npz", [20, 1, 2]), val_fraction=0.4, test_fraction=0.4,
                     preprocess="none")
    assert set(d.y_train.tolist()) == {0, 1, 2}


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    name = _ids_npz(tmp_path / "a.npz", [40, 30, 30])
    a, b, c = (load_dataset(name, seed=s, preprocess="none") for s in (7, 7, 8))
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert _ids(a.x_val) != _ids(c.x_val)


def test_splits_are_shuffled(tmp_path):
    d = load_dataset(_ids_npz(tmp_path / "a.npz", [40, 30, 30]), preprocess="none")
    assert len(set(d.y_train[:20].tolist())) > 1


def test_empty_validation_split_is_refused(tmp_path):
    with pytest.raises(DataError, match="validation split is empty"):
        load_dataset(_ids_npz(tmp_path / "a.npz", [3, 3]), val_fraction=0.05, test_fraction=0.0)


# --- preprocessing, dtypes -----------------------------------------------------------------------

@pytest.fixture
def random_npz(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, (120, 2, 3))
    x[:, 0, 0] = 4.0  # a constant feature
    np.savez(tmp_path / "r.npz", x=x, y=rng.integers(0, 3, 120))
    return f"npz:{tmp_path / 'r.npz'}"


def test_mean_uses_training_statistics_only(random_npz):
    raw = load_dataset(random_npz, seed=4, preprocess="none")
    d = load_dataset(random_npz, seed=4, preprocess="mean")
    mean = raw.x_train.astype(np.float64).mean(axis=0)
    for split in ("train", "val", "test"):
        expected = getattr(raw, f"x_{split}").astype(np.float64) - mean
        np.testing.assert_allclose(getattr(d, f"x_{split}"), expected, atol=1e-5)
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert np.abs(d.x_val.mean(axis=0)).max() > 1e-3  # the val mean is not subtracted


def test_standardize_uses_training_statistics_only(random_npz):
    raw = load_dataset(random_npz, seed=4, preprocess="none")
    d = load_dataset(random_npz, seed=4, preprocess="standardize")
    mean, std = raw.x_train.astype(np.float64).mean(axis=0), raw.x_train.astype(np.float64).std(axis=0)
    std[0, 0] = 1.0  # constant on train: only centred
    for split in ("train", "val", "test"):
        expected = (getattr(raw, f"x_{split}").astype(np.float64) - mean) / std
        np.testing.assert_allclose(getattr(d, f"x_{split}"), expected, atol=1e-5)
    assert np.all(np.isfinite(d.x_train)) and np.all(d.x_train[:, 0, 0] == 0)
    np.testing.assert_allclose(d.x_train.std(axis=0)[0, 1:], 1.0, atol=1e-5)


def test_dtypes_layout_and_read_only(random_npz):
    d = load_dataset(random_npz)
    assert d.input_shape == (2, 3)
    for split in ("train", "val", "test"):
        x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
        assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int64
        assert not x.flags.writeable and not y.flags.writeable


def test_labels_are_remapped(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones((30, 2)), y=np.repeat([3.0, 7.0, 9.0], 10))
    d = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert d.num_classes == 3 and set(d.y_train.tolist()) == {0, 1, 2}
    assert d.classes.tolist() == [3, 7, 9] and d.classes.dtype == np.int64
    assert load_dataset("spiral").classes is None  # labels already 0..C-1
    # classes[y] gives back every sample's original label (x carries it here)
    y = np.repeat([3, 7, 9], 10)
    np.savez(tmp_path / "b.npz", x=np.stack([y, y], axis=1).astype(float), y=y)
    d = load_dataset(f"npz:{tmp_path / 'b.npz'}", preprocess="none")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(d.classes[getattr(d, f"y_{split}")], getattr(d, f"x_{split}")[:, 0])


def test_dataset_validates_its_fields():
    x, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    Dataset("t", x, y, x, y, x, y, num_classes=2, input_shape=(3,))
    with pytest.raises(DataError, match="Dataset.x_val"):
        Dataset("t", x, y, x.astype(np.float64), y, x, y, num_classes=2, input_shape=(3,))
    with pytest.raises(DataError, match="Dataset.y_test"):
        Dataset("t", x, y, x, y, x, np.array([0, 2]), num_classes=2, input_shape=(3,))
    Dataset("t", x, y, x, y, x, y, num_classes=2, input_shape=(3,), classes=np.array([4, 8]))
    with pytest.raises(DataError, match="Dataset.classes"):
        Dataset("t", x, y, x, y, x, y, num_classes=2, input_shape=(3,), classes=np.array([4, 8, 9]))


# --- npz ---------------------------------------------------------------------------------------

def test_npz_with_test_only_carves_validation_from_train(tmp_path):
    x_test = np.full((7, 3), 1000.0)
    name = _ids_npz(tmp_path / "a.npz", [20, 20], x_test=x_test, y_test=np.array([0, 1, 0, 1, 0, 1, 0]))
    d = load_dataset(name, preprocess="none", test_fraction=0.5)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (34, 6, 7)
    assert np.all(d.x_test == 1000.0) and d.y_test.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert _ids(d.x_train) | _ids(d.x_val) == set(range(40))


def test_npz_with_val_and_test_uses_them(tmp_path):
    name = _ids_npz(tmp_path / "a.npz", [5, 5], x_val=np.zeros((4, 3)), y_val=np.array([0, 1, 1, 0]),
                    x_test=np.zeros((2, 3)), y_test=np.array([1, 0]))
    d = load_dataset(name, preprocess="none")
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (10, 4, 2)
    assert d.y_val.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.ones((4, 2))}, r"npz:.*a\.npz: missing array 'y'"),
    ({"x": np.array([[1], "a", None, 2.0], dtype=object), "y": np.arange(4)}, "array 'x' is an object array"),
    ({"x": np.ones((4, 2)), "y": np.arange(4), "x_val": np.ones((2, 2))}, "'x_val' and 'y_val' must come together"),
    ({"x": np.array([["a", "b"]] * 4), "y": np.arange(4)}, "x has dtype <U1, expected numbers"),
    ({"x": np.ones(4), "y": np.arange(4)}, r"x has shape \(4,\), expected"),
    ({"x": np.ones((4, 2)), "y": np.arange(5)}, r"y has shape \(5,\), expected \(4,\)"),
    ({"x": np.ones((4, 2)), "y": np.array([0, 1, 0.5, 1])}, "y must hold integer class labels"),
    ({"x": np.ones((4, 2)), "y": np.zeros(4)}, "needs at least 2 classes"),
    ({"x": np.array([[1, 2], [3, np.nan], [1, 1], [0, 0]]), "y": np.arange(4)}, "x has non-finite .* sample 1"),
    ({"x": np.ones((4, 2)), "y": np.arange(4), "x_test": np.ones((2, 3)), "y_test": np.arange(2)},
     r"x_test samples have shape \(3,\), x has \(2,\)"),
])
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(f"npz:{tmp_path / 'a.npz'}")


def test_npz_missing_or_not_an_archive(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(DataError, match="single array"):
        load_dataset(f"npz:{tmp_path / 'one.npy'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz archive"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


# --- cifar10 -----------------------------------------------------------------------------------

def test_cifar10_binary(tmp_path):
    test = _write_cifar(tmp_path)
    d = load_dataset(f"cifar10:{tmp_path}", preprocess="none", val_fraction=0.2)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 3
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (24, 6, 4)
    assert d.y_test.tolist() == [2, 0, 1, 1]
    assert np.array_equal(d.x_test[0, 1, 0, :], test[0, 1 + 1024:1 + 1024 + 32])  # green channel, first row


def test_cifar10_python_version_is_refused(tmp_path):
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (tmp_path / name).write_bytes(b"\x80\x04 pickle")
    with pytest.raises(DataError, match="python version.*binary version"):
        load_dataset(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "data_batch_3.bin").unlink(), "missing data_batch_3.bin"),
    (lambda d: (d / "test_batch.bin").write_bytes(b"\x00" * 3074), "test_batch.bin has 3074 bytes"),
    (lambda d: _cifar_records([1, 12], np.random.default_rng(0)).tofile(d / "data_batch_2.bin"),
     "label 12 out of range 0..9 in data_batch_2.bin record 1"),
])
def test_cifar10_errors(tmp_path, damage, message):
    _write_cifar(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("kind", ["cifar10", "mnist"])
def test_image_datasets_feed_an_mlp_flattened_and_conv2d_as_images(tmp_path, kind):
    from nncore.model import build_model

    (_write_cifar if kind == "cifar10" else _write_mnist)(tmp_path)
    d = load_dataset(f"{kind}:{tmp_path}", val_fraction=0.2)
    channels, height, width = d.input_shape
    mlp = build_model({"hidden": [5]}, d.input_shape, d.num_classes, seed=0)
    assert mlp.params["W1"].shape == (channels * height * width, 5)
    flat = build_model({"hidden": [5]}, (channels * height * width,), d.num_classes, seed=0)
    np.testing.assert_array_equal(mlp.scores(d.x_val), flat.scores(d.x_val.reshape(len(d.x_val), -1)))
    conv = build_model({"arch": "conv2d", "conv_channels": [2], "conv_kernel": 3, "conv_pool": 2, "hidden": [4]},
                       d.input_shape, d.num_classes, seed=0)
    assert conv.params["Wc1"].shape == (2, channels, 3, 3)
    assert conv.params["W1"].shape == (2 * (height // 2) * (width // 2), 4)
    loss, grads = conv.loss(d.x_train, d.y_train, reg=0.0, rng=np.random.default_rng(0))
    assert np.isfinite(loss) and grads["Wc1"].shape == (2, channels, 3, 3) and np.abs(grads["Wc1"]).sum() > 0


# --- mnist -------------------------------------------------------------------------------------

def test_mnist_idx_plain_and_gz(tmp_path):
    _write_mnist(tmp_path)
    d = load_dataset(f"mnist:{tmp_path}", preprocess="none", val_fraction=0.2)
    assert d.input_shape == (1, 4, 5) and d.num_classes == 3
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (24, 6, 6)
    assert d.y_test.tolist() == [0, 1, 2, 0, 1, 2]


def test_mnist_bad_magic(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    _write_idx(tmp_path / "train-images-idx3-ubyte", 2049, np.zeros(30))
    with pytest.raises(DataError, match=rf"^mnist:{tmp_path}: bad magic number 2049 in train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), "missing t10k-labels-idx1-ubyte"),
    (lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(
        (d / "t10k-images-idx3-ubyte").read_bytes()[:-1]), "t10k-images-idx3-ubyte has 135 bytes"),
    (lambda d: _write_idx(d / "t10k-labels-idx1-ubyte", 2049, np.zeros(5)), "has 6 images but .* 5 labels"),
    (lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage"), "cannot read train-labels"),
])
def test_mnist_errors(tmp_path, damage, message):
    _write_mnist(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(f"mnist:{tmp_path}")


# --- csv ---------------------------------------------------------------------------------------

def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_csv_default_and_named_label_column(tmp_path):
    rows = [(i, i * 0.5, i % 2) for i in range(20)]
    _write_csv(tmp_path / "a.csv", ["f1", "f2", "label"], rows)
    d = load_dataset(f"csv:{tmp_path / 'a.csv'}", preprocess="none")
    assert d.input_shape == (2,) and d.num_classes == 2
    assert np.array_equal(d.y_train, d.x_train[:, 0].astype(int) % 2)
    _write_csv(tmp_path / "b.csv", ["cls", "f1", "f2"], [(r[2], r[0], r[1]) for r in rows])
    e = load_dataset(f"csv:{tmp_path / 'b.csv'}:cls", preprocess="none")
    assert np.array_equal(e.y_train, e.x_train[:, 0].astype(int) % 2)


def test_csv_path_containing_a_colon(tmp_path):
    _write_csv(tmp_path / "a:b.csv", ["x", "label"], [(i, i % 2) for i in range(20)])
    assert load_dataset(f"csv:{tmp_path / 'a:b.csv'}").num_classes == 2


@pytest.mark.parametrize("text, message", [
    ("x,label\n1,0\n2,1\n\n3,abc\n", r"line 5, column 2: not a number$"),
    ("x,label\n1,0\n2\n", "line 3: expected 2 fields, got 1"),
    ("x,y\n1,0\n", r"no column 'label' in the header \(first line\) of a.csv, which has 2 column"),
    ("x,label\n1,0.5\n", r"line 2, column 2: the label is not an integer$"),
    ("x,label\nnan,1\n", "line 2, column 1: not a finite number$"),
    ("x,label\n", "has no data rows"),
])
def test_csv_errors(tmp_path, text, message):
    (tmp_path / "a.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset(f"csv:{tmp_path / 'a.csv'}")


# --- names, options, cache ---------------------------------------------------------------------

def test_unknown_name_lists_the_known_ones():
    known = r"\(known: digits, spiral, waves, shapes, npz:PATH, .*csv:"
    with pytest.raises(DataError, match=r"unknown dataset 'foo' " + known):
        load_dataset("foo")


@pytest.mark.parametrize("name, message", [
    ("spiral:5", "dataset 'spiral' takes no argument"),
    ("npz:", "expected npz:PATH"),
    ("mnist:", "expected mnist:DIR"),
])
def test_malformed_names(name, message):
    with pytest.raises(DataError, match=message):
        load_dataset(name)


@pytest.mark.parametrize("options, message", [
    ({"preprocess": "whiten"}, "preprocess: expected one of none, mean, standardize"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
])
def test_bad_options(options, message):
    with pytest.raises(DataError, match=message):
        load_dataset("spiral", **options)


def test_descriptions_cover_every_loader():
    kinds = {key.partition(":")[0] for key in DATASETS}
    assert kinds == set(data._BUILTIN) | set(data._FILE_READERS)
    assert all(isinstance(text, str) and "\n" not in text for text in DATASETS.values())


def test_cache_returns_the_same_object():
    load_dataset_cached.cache_clear()
    a = load_dataset_cached("spiral", seed=3)
    assert load_dataset_cached("spiral", seed=3) is a
    assert load_dataset_cached("spiral", seed=4) is not a
    assert not a.x_train.flags.writeable

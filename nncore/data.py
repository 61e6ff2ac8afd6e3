"""Load a named dataset, split it once (seeded, stratified) and preprocess it with training-split statistics."""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import logging
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nncore.errors import DataError
from nncore.io import check_npz_sizes

logger = logging.getLogger(__name__)

DATASETS = {
    "digits": "scikit-learn's bundled 8x8 digits: 1797 samples of shape (64,), 10 classes",
    "spiral": "cs231n's 2-D spiral: 3 classes x 100 points, shape (2,), fixed generator seed",
    "waves": "synthetic sequences of shape (1, 64): sine/square/triangle/sawtooth + noise, 4 x 250",
    "shapes": "synthetic noisy images of shape (1, 16, 16): circle/square/triangle/cross outlines, 4 x 750",
    "npz:PATH": "NumPy .npz with arrays x, y (optional x_val/y_val, x_test/y_test), no pickle",
    "cifar10:DIR": "CIFAR-10 binary version (data_batch_1..5.bin, test_batch.bin), shape (3, 32, 32)",
    "mnist:DIR": "MNIST-format idx files, optionally .gz (train-*, t10k-*), shape (1, 28, 28)",
    "csv:PATH[:LABEL_COLUMN]": "CSV with a header row, numeric values, label column default 'label'",
}
PREPROCESS = ("none", "mean", "standardize")
DATA_DEFAULTS = {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15, "preprocess": "mean"}

_GENERATOR_SEED = 0  # spiral, waves and shapes are fixed data sets; `seed` only picks their split
_CHUNK = 8192  # rows per block when accumulating variances in float64
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049
_NPZ_ARRAYS = ("x", "y", "x_val", "y_val", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """Three splits of one dataset: x float32 of shape (N, *input_shape), y int64 in 0..num_classes-1;
    ``classes[i]`` is the label class i had in the source data (None: the labels were 0..num_classes-1)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    classes: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.input_shape, tuple):
            raise DataError(f"Dataset.input_shape: expected a tuple, got {self.input_shape!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise DataError(f"Dataset.num_classes: expected an int >= 2, got {self.num_classes!r}")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape[1:] != self.input_shape:
                raise DataError(f"Dataset.x_{split}: expected float32 of shape (N, *{self.input_shape}), "
                                f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                raise DataError(f"Dataset.y_{split}: expected int64 of shape ({len(x)},), "
                                f"got {getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(f"Dataset.y_{split}: labels must lie in 0..{self.num_classes - 1}")
        if self.classes is not None and (not isinstance(self.classes, np.ndarray) or self.classes.dtype != np.int64
                                         or self.classes.shape != (self.num_classes,)):
            raise DataError(f"Dataset.classes: expected int64 of shape ({self.num_classes},), "
                            f"got {getattr(self.classes, 'dtype', type(self.classes).__name__)} "
                            f"{getattr(self.classes, 'shape', '')}")


def load_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 preprocess: str = "mean") -> Dataset:
    """Load dataset `name` (see DATASETS), split it and preprocess it; raise DataError naming what is wrong.

    Names: "digits", "spiral", "waves", "shapes", "npz:PATH", "cifar10:DIR", "mnist:DIR", "csv:PATH[:LABEL_COLUMN]".
    Splits the data brings (npz x_val/x_test, the MNIST and CIFAR-10 test sets) are used as they are; the
    missing ones are carved from the training data, stratified by class and seeded by `seed`, as
    `val_fraction` / `test_fraction` of it (each class keeps at least one training sample). Every split is
    in a seeded random order. `preprocess` "mean" subtracts the per-feature training mean, "standardize"
    also divides by the per-feature training standard deviation (features constant on the training split
    are only centred), "none" leaves the values raw (pixels stay 0..255). Samples keep their natural shape
    (images (C, H, W), sequences (C, L), tables (D,)); an MLP flattens them. Labels are remapped to
    0..C-1 in sorted order (``classes`` keeps the original ones). The CIFAR-10 *python* version is refused:
    its batches are pickles, which nncore never loads; use the binary version (cifar-10-binary.tar.gz) or
    convert the data to npz.
    The arrays of the result are read-only.
    """
    validate_data_options({"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                           "preprocess": preprocess})
    if not isinstance(name, str):
        raise DataError(f"dataset name: expected a string, got {name!r}")
    splits = _read(name)
    input_shape = _check_arrays(name, splits)
    labels, classes = _encode_labels(name, splits)
    num_classes = len(classes)
    rng = np.random.default_rng(seed)
    indices = _stratified_indices(labels["train"], num_classes,
                                  0.0 if "val" in splits else val_fraction,
                                  0.0 if "test" in splits else test_fraction, rng)
    x_pool = splits["train"][0]
    xs, ys = {}, {}
    for split, idx in zip(("train", "val", "test"), indices):
        if split != "train" and split in splits:
            xs[split], ys[split] = np.ascontiguousarray(splits[split][0], dtype=np.float32), labels[split]
        else:
            xs[split], ys[split] = np.ascontiguousarray(x_pool[idx], dtype=np.float32), labels["train"][idx]
    if len(xs["val"]) == 0:
        raise DataError(f"{name}: the validation split is empty ({len(labels['train'])} samples to carve it from, "
                        f"val_fraction={val_fraction})")
    _preprocess(xs, preprocess)
    for array in (*xs.values(), *ys.values(), classes):
        array.setflags(write=False)
    missing = sorted(set(range(num_classes)) - set(np.unique(ys["train"]).tolist()))
    if missing:
        logger.warning("%s: classes %s have no training sample", name, missing)
    logger.info("%s: %d train / %d val / %d test samples, %d classes, input shape %s, preprocess=%s",
                name, len(ys["train"]), len(ys["val"]), len(ys["test"]), num_classes, input_shape, preprocess)
    return Dataset(name=name, x_train=xs["train"], y_train=ys["train"], x_val=xs["val"], y_val=ys["val"],
                   x_test=xs["test"], y_test=ys["test"], num_classes=num_classes, input_shape=input_shape,
                   classes=None if np.array_equal(classes, np.arange(num_classes)) else classes)


@functools.lru_cache(maxsize=2)
def load_dataset_cached(name: str, *, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                        preprocess: str = "mean") -> Dataset:
    """load_dataset memoised per process by its arguments (a changed file is not re-read); arrays are read-only."""
    return load_dataset(name, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                        preprocess=preprocess)


def validate_data_options(options) -> dict:
    """The data options (``seed``, ``val_fraction``, ``test_fraction``, ``preprocess``) with defaults filled in
    and checked: the one definition of what a dataset split accepts. DataError names ``data.<field>``."""
    if not isinstance(options, dict):
        raise DataError(f"data: expected a table, got {type(options).__name__}")
    unknown = sorted(set(options) - set(DATA_DEFAULTS))
    if unknown:
        raise DataError(f"data.{unknown[0]}: unknown field (known: {', '.join(DATA_DEFAULTS)})")
    out = {**DATA_DEFAULTS, **options}
    seed, val_fraction, test_fraction, preprocess = (out[k] for k in DATA_DEFAULTS)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"data.seed: expected a non-negative int, got {seed!r}")
    for field, value, low_open in (("val_fraction", val_fraction, True), ("test_fraction", test_fraction, False)):
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                or not (0 < value < 1 if low_open else 0 <= value < 1)):
            bounds = "0 < value < 1" if low_open else "0 <= value < 1"
            raise DataError(f"data.{field}: expected a number with {bounds}, got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"data.val_fraction + test_fraction: must be below 1, got {val_fraction} + {test_fraction}")
    if preprocess not in PREPROCESS:
        raise DataError(f"data.preprocess: expected one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    return out


def _read(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw splits of dataset `name`: {"train": (x, y)} plus "val" / "test" where the data brings them."""
    kind, colon, arg = name.partition(":")
    if kind in _BUILTIN:
        if colon:
            raise DataError(f"dataset '{kind}' takes no argument, got '{name}'")
        return _BUILTIN[kind]()
    if kind in _FILE_READERS:
        if not arg:
            raise DataError(f"dataset '{name}': expected {kind}:{'DIR' if kind in ('cifar10', 'mnist') else 'PATH'}")
        return _FILE_READERS[kind](name, arg)
    raise DataError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")


def _array_name(prefix: str, split: str) -> str:
    return prefix if split == "train" else f"{prefix}_{split}"


def _check_arrays(name: str, splits: dict) -> tuple:
    """Check shapes, dtypes and finiteness of the raw splits; return the per-sample shape."""
    input_shape = tuple(int(n) for n in splits["train"][0].shape[1:])
    for split, (x, y) in splits.items():
        x_name, y_name = _array_name("x", split), _array_name("y", split)
        if x.dtype.kind not in "biuf":
            raise DataError(f"{name}: {x_name} has dtype {x.dtype}, expected numbers")
        if x.ndim < 2:
            raise DataError(f"{name}: {x_name} has shape {x.shape}, expected (samples, features...)")
        if x.shape[1:] != input_shape:
            raise DataError(f"{name}: {x_name} samples have shape {x.shape[1:]}, x has {input_shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{name}: {y_name} has shape {y.shape}, expected ({len(x)},) to match {x_name}")
        if x.dtype.kind == "f":
            bad = ~(np.abs(x.reshape(len(x), -1)) <= _FLOAT32_MAX).all(axis=1) if x.size else np.zeros(0, bool)
            if bad.any():
                raise DataError(f"{name}: {x_name} has non-finite or float32-overflowing values "
                                f"(first in sample {int(np.flatnonzero(bad)[0])})")
    if len(splits["train"][0]) == 0:
        raise DataError(f"{name}: no training samples")
    return input_shape


def _encode_labels(name: str, splits: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Map the labels of every split to int64 0..C-1 (sorted order of the distinct labels); return them and
    the distinct labels (int64), class i's original label at index i."""
    for split, (_, y) in splits.items():
        integral = y.dtype.kind in "biu" or (y.dtype.kind == "f" and bool(np.all(np.isfinite(y) & (y == np.round(y)))))
        if not integral:
            raise DataError(f"{name}: {_array_name('y', split)} must hold integer class labels (dtype {y.dtype})")
    classes = np.unique(np.concatenate([y for _, y in splits.values()])).astype(np.int64)
    if len(classes) < 2:
        raise DataError(f"{name}: needs at least 2 classes, found {len(classes)}")
    if not np.array_equal(classes, np.arange(len(classes))):
        logger.info("%s: labels %s remapped to 0..%d", name, classes[:20].tolist(), len(classes) - 1)
    return {split: np.searchsorted(classes, y).astype(np.int64) for split, (_, y) in splits.items()}, classes


def _allocate(counts: np.ndarray, fraction: float, spare: np.ndarray) -> np.ndarray:
    """Per-class counts, proportional to `counts`, at most `spare`, summing to round(fraction * total) if possible."""
    quota = counts * fraction
    alloc = np.minimum(np.floor(quota + 1e-9).astype(np.int64), spare)
    short = math.floor(fraction * counts.sum() + 0.5) - int(alloc.sum())
    for c in np.argsort(alloc - quota, kind="stable"):  # the largest unmet quota first
        if short <= 0:
            break
        if alloc[c] < spare[c]:
            alloc[c] += 1
            short -= 1
    return alloc


def _stratified_indices(y: np.ndarray, num_classes: int, val_fraction: float, test_fraction: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint (train, val, test) indices into y, stratified by class, each in a random order."""
    counts = np.bincount(y, minlength=num_classes)
    spare = np.maximum(counts - 1, 0)  # every class present keeps one training sample
    n_val = _allocate(counts, val_fraction, spare)
    n_test = _allocate(counts, test_fraction, spare - n_val)
    parts = ([], [], [])
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(y == c))
        parts[1].append(members[:n_val[c]])
        parts[2].append(members[n_val[c]:n_val[c] + n_test[c]])
        parts[0].append(members[n_val[c] + n_test[c]:])
    return tuple(rng.permutation(np.concatenate(p).astype(np.int64)) for p in parts)


def preprocessing_stats(x_train: np.ndarray, mode: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(mean, scale) of preprocess `mode` fitted on the training split: float32 per-feature arrays, None where
    the mode does not use one ("none": neither, "mean": no scale)."""
    if mode not in PREPROCESS:
        raise DataError(f"preprocess: expected one of {', '.join(PREPROCESS)}, got {mode!r}")
    if mode == "none":
        return None, None
    mean = x_train.mean(axis=0, dtype=np.float64)
    scale = None
    if mode == "standardize":
        sum_sq = np.zeros_like(mean)
        for start in range(0, len(x_train), _CHUNK):
            centred = x_train[start:start + _CHUNK] - mean
            sum_sq += (centred * centred).sum(axis=0)
        std = np.sqrt(sum_sq / len(x_train))
        scale = np.where(std > 1e-6 * (1.0 + np.abs(mean)), std, 1.0).astype(np.float32)
    return mean.astype(np.float32), scale


def apply_preprocessing(x: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None) -> None:
    """Centre x by `mean` and divide it by `scale` in place (either may be None), as preprocessing_stats fitted."""
    if mean is not None:
        x -= mean
    if scale is not None:
        x /= scale


def _preprocess(xs: dict[str, np.ndarray], mode: str) -> None:
    """Centre (and for "standardize" scale) every split in place with the training split's statistics."""
    mean, scale = preprocessing_stats(xs["train"], mode)
    for x in xs.values():
        apply_preprocessing(x, mean, scale)


def _read_digits() -> dict:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("digits: needs scikit-learn installed (its bundled digits.csv.gz is read without "
                        "importing it); pip install scikit-learn, or use another dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"digits: cannot read scikit-learn's {path}: {exc}") from None
    if table.shape[1] != 65:
        raise DataError(f"digits: {path} has {table.shape[1]} columns, expected 64 pixels + 1 label")
    return {"train": (table[:, :-1], table[:, -1])}


def make_spiral(per_class: int = 100, classes: int = 3, seed: int = _GENERATOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """cs231n's spiral: `classes` arms of `per_class` 2-D points (x float64 (N, 2), y int (N,)); the
    built-in "spiral" is make_spiral() (3 x 100), larger ones serve as harder tasks (npz:PATH)."""
    rng = np.random.default_rng(seed)
    x = np.empty((per_class * classes, 2))
    radius = np.linspace(0.0, 1.0, per_class)
    for j in range(classes):
        theta = np.linspace(j * 4, (j + 1) * 4, per_class) + rng.standard_normal(per_class) * 0.2
        x[j * per_class:(j + 1) * per_class] = np.c_[radius * np.sin(theta), radius * np.cos(theta)]
    return x, np.repeat(np.arange(classes), per_class)


def make_waves(per_class: int = 250, length: int = 64, seed: int = _GENERATOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Noisy sine/square/triangle/sawtooth sequences (x float64 (N, 1, length), y int (N,)) of random
    frequency, phase and amplitude; the built-in "waves" is make_waves() (4 x 250)."""
    rng = np.random.default_rng(seed)
    classes = 4
    n = per_class * classes
    y = np.repeat(np.arange(classes), per_class)
    cycles = rng.uniform(2.0, 5.0, (n, 1)) * np.arange(length) / length + rng.uniform(0.0, 1.0, (n, 1))
    phase = cycles % 1.0
    shapes = np.stack([np.sin(2 * np.pi * cycles),  # sine
                       np.where(phase < 0.5, 1.0, -1.0),  # square
                       4.0 * np.abs(phase - 0.5) - 1.0,  # triangle
                       2.0 * phase - 1.0])  # sawtooth
    x = rng.uniform(0.8, 1.2, (n, 1)) * shapes[y, np.arange(n)] + 0.3 * rng.standard_normal((n, length))
    return x[:, None, :], y


def make_shapes(per_class: int = 750, size: int = 16, noise: float = 0.4,
                seed: int = _GENERATOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images of shape outlines (x float64 (N, 1, size, size), y int (N,)): circle, square, triangle and
    cross, one stroke ~1.5 pixels wide, of random radius (3 to 6 pixels), position and intensity, plus Gaussian
    noise of std `noise`; the built-in "shapes" is make_shapes() (4 x 750).

    The class lies in local stroke patterns anywhere in the image, which a small ConvNet picks up and an MLP
    on the raw pixels (it must learn every position separately) finds much harder.
    """
    rng = np.random.default_rng(seed)
    classes = 4
    n = per_class * classes
    y = np.repeat(np.arange(classes), per_class)
    radius = rng.uniform(3.0, 6.0, n)
    centre_x, centre_y = (rng.uniform(radius, size - 1 - radius)[:, None, None] for _ in range(2))
    r = radius[:, None, None]
    grid = np.arange(size, dtype=np.float64)
    dx, dy = grid[None, None, :] - centre_x, grid[None, :, None] - centre_y
    adx, ady = np.abs(dx), np.abs(dy)
    half = 0.75  # half the stroke width
    triangle = (ady <= r) & (adx <= (dy + r) / 2 + half)  # apex up, base 2r wide
    hollow = (dy >= -r + 2.5) & (dy <= r - 1.2) & (adx <= (dy + r) / 2 - 1.3)
    strokes = np.stack([np.abs(np.hypot(dx, dy) - r) < half,  # circle
                        np.abs(np.maximum(adx, ady) - r) < half,  # square
                        triangle & ~hollow,  # triangle
                        ((adx < half) & (ady <= r)) | ((ady < half) & (adx <= r))])  # cross
    x = strokes[y, np.arange(n)] * rng.uniform(0.6, 1.4, (n, 1, 1)) + noise * rng.standard_normal((n, size, size))
    return x[:, None], y


def _read_spiral() -> dict:
    return {"train": make_spiral()}


def _read_waves() -> dict:
    return {"train": make_waves()}


def _read_shapes() -> dict:
    return {"train": make_shapes()}


def _read_npz(name: str, arg: str) -> dict:
    path = Path(arg).expanduser()
    if not path.is_file():
        raise DataError(f"{name}: no such file")
    try:
        check_npz_sizes(path)
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{name}: not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{name}: holds a single array, expected an .npz archive with arrays x and y")
    with archive:
        present = set(archive.files)
        for key in ("x", "y"):
            if key not in present:
                raise DataError(f"{name}: missing array '{key}' (has: {', '.join(sorted(present)) or 'none'})")
        for split in ("val", "test"):
            if (f"x_{split}" in present) != (f"y_{split}" in present):
                raise DataError(f"{name}: arrays 'x_{split}' and 'y_{split}' must come together")
        extra = sorted(present - set(_NPZ_ARRAYS))
        if extra:
            logger.warning("%s: ignoring arrays %s", name, extra)
        arrays = {}
        for key in _NPZ_ARRAYS:
            if key not in present:
                continue
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                raise DataError(f"{name}: array '{key}' is an object array; it would need unpickling, which is "
                                f"refused ({exc}); save plain numeric arrays") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError) as exc:
                raise DataError(f"{name}: array '{key}' is corrupt or too large ({exc or 'out of memory'})") from None
    return {split: (arrays[_array_name("x", split)], arrays[_array_name("y", split)])
            for split in ("train", "val", "test") if _array_name("x", split) in arrays}


def _read_cifar10(name: str, arg: str) -> dict:
    directory = Path(arg).expanduser()
    if not directory.is_dir():
        raise DataError(f"{name}: not a directory")
    python_version = any((directory / f).exists() for f in ("data_batch_1", "test_batch"))
    if python_version and not (directory / _CIFAR_TRAIN[0]).exists():
        raise DataError(f"{name}: this is the CIFAR-10 python version, whose batches are pickles, which nncore "
                        f"never loads; download the binary version (cifar-10-binary.tar.gz) or convert to npz:PATH")
    train = [_read_cifar_batch(name, directory / f) for f in _CIFAR_TRAIN]
    return {"train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
            "test": _read_cifar_batch(name, directory / _CIFAR_TEST)}


def _read_cifar_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{name}: missing {path.name} (the CIFAR-10 binary version has "
                        f"{', '.join(_CIFAR_TRAIN)} and {_CIFAR_TEST})")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{name}: cannot read {path.name}: {exc}") from None
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{name}: {path.name} has {raw.size} bytes, not a positive multiple of {_CIFAR_RECORD} "
                        f"(1 label byte + 3072 pixel bytes per record)")
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        first = int(np.argmax(labels > 9))
        raise DataError(f"{name}: label {labels[first]} out of range 0..9 in {path.name} record {first}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _read_mnist(name: str, arg: str) -> dict:
    directory = Path(arg).expanduser()
    if not directory.is_dir():
        raise DataError(f"{name}: not a directory")
    splits = {}
    for split, (images_file, labels_file) in _MNIST_FILES.items():
        images = _read_idx(name, directory, images_file, _IDX_IMAGES)
        labels = _read_idx(name, directory, labels_file, _IDX_LABELS)
        if len(images) != len(labels):
            raise DataError(f"{name}: {images_file} has {len(images)} images but {labels_file} "
                            f"has {len(labels)} labels")
        splits[split] = (images[:, None], labels)
    return splits


def _read_idx(name: str, directory: Path, base: str, magic: int) -> np.ndarray:
    """An idx file of unsigned bytes (`base` or `base`.gz in `directory`), checked against its header."""
    path = next((p for p in (directory / base, directory / f"{base}.gz") if p.is_file()), None)
    if path is None:
        raise DataError(f"{name}: missing {base} (or {base}.gz)")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{name}: cannot read {path.name}: {exc}") from None
    if len(data) < 4:
        raise DataError(f"{name}: {path.name} is truncated ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{name}: bad magic number {found} in {path.name} (expected {magic})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: {path.name} is truncated ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(dims):
        raise DataError(f"{name}: {path.name} has {len(data)} bytes, its header (sizes {dims}) "
                        f"implies {header + math.prod(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_csv(name: str, arg: str) -> dict:
    path, column = Path(arg).expanduser(), "label"
    if not path.is_file():
        head, colon, tail = arg.rpartition(":")
        if colon:
            path, column = Path(head).expanduser(), tail
    if not path.is_file():
        raise DataError(f"{name}: no such file {path}")
    if not column:
        raise DataError(f"{name}: empty label column name")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [field.strip() for field in next(reader, [])]
            if column not in header:
                raise DataError(f"{name}: no column '{column}' in the header (first line) of {path.name}, "
                                f"which has {len(header)} column(s)")
            if len(header) < 2:
                raise DataError(f"{name}: {path.name} has no feature columns besides '{column}'")
            label = header.index(column)
            rows = [_csv_row(name, reader.line_num, header, label, row) for row in reader if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:  # the message of either may quote the file
        raise DataError(f"{name}: cannot read {path.name} as UTF-8 CSV ({type(exc).__name__})") from None
    if not rows:
        raise DataError(f"{name}: {path.name} has no data rows")
    table = np.array(rows)
    return {"train": (np.delete(table, label, axis=1), table[:, label])}


def _csv_row(name: str, line: int, header: list[str], label: int, row: list[str]) -> list[float]:
    """The values of one CSV row; errors name the line and the column."""
    if len(row) != len(header):
        raise DataError(f"{name}: line {line}: expected {len(header)} fields, got {len(row)}")
    values = []
    for column, text in enumerate(row, 1):
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{name}: line {line}, column {column}: not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{name}: line {line}, column {column}: not a finite number")
        values.append(value)
    if not values[label].is_integer():
        raise DataError(f"{name}: line {line}, column {label + 1}: the label is not an integer")
    return values


_BUILTIN = {"digits": _read_digits, "spiral": _read_spiral, "waves": _read_waves, "shapes": _read_shapes}
_FILE_READERS = {"npz": _read_npz, "cifar10": _read_cifar10, "mnist": _read_mnist, "csv": _read_csv}

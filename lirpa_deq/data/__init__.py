"""Datasets for lirpa_deq (no downloads): embedded MNIST-5k and 8x8 digits, local MNIST/CIFAR-10.

See ``docs/data.md``.  All images are float32 in [0, 1], channels first; labels int64.
"""
from .embedded import balanced_split, load_digits8x8, load_mnist5k
from .local import load_cifar10, load_mnist, read_idx
from .registry import DATASETS, DEFAULT_DATASET, DatasetInfo, dataset_info, get_dataset

__all__ = [
    "load_mnist5k", "load_digits8x8", "load_mnist", "load_cifar10", "read_idx", "balanced_split",
    "get_dataset", "dataset_info", "DatasetInfo", "DATASETS", "DEFAULT_DATASET",
]

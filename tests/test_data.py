"""Tests for lirpa_deq.data (no network; local loaders use tiny synthetic files in tmp_path)."""
import gzip
import pickle
import struct
import types

import numpy as np
import pytest
import torch

from lirpa_deq.data import (
    DATASETS, balanced_split, dataset_info, get_dataset, load_cifar10, load_digits8x8, load_mnist,
    load_mnist5k, read_idx,
)
from lirpa_deq.data import embedded, local


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ----------------------------------------------------------------------------- embedded MNIST
def test_mnist5k_shapes_ranges_balance(cache):
    tr, te = load_mnist5k("train", cache_dir=cache), load_mnist5k("test", cache_dir=cache)
    (xtr, ytr), (xte, yte) = tr.tensors, te.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0 and float(xtr.max()) > 0.99
    assert torch.equal(torch.bincount(yte, minlength=10), torch.full((10,), 100))
    assert torch.equal(torch.bincount(ytr, minlength=10), torch.full((10,), 400))
    # train and test are disjoint rows of the source
    all_x, _ = embedded.mnist5k_arrays(cache)
    tr_idx, te_idx = balanced_split(embedded.mnist5k_arrays(cache)[1], 100, "mnist5k")
    assert len(np.intersect1d(tr_idx, te_idx)) == 0 and len(tr_idx) + len(te_idx) == 5000
    assert torch.equal(xte, torch.from_numpy(all_x[te_idx].astype(np.float32) / 255).reshape(-1, 1, 28, 28))


def test_mnist5k_deterministic(cache):
    a, b = load_mnist5k("test", cache_dir=cache), load_mnist5k("test", cache_dir=cache)
    assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))


def test_cache_hit_equals_fresh_parse(cache, monkeypatch):
    load_mnist5k("test", cache_dir=cache)  # ensure the cache exists
    assert (cache / "mnist5k_v1.npz").is_file()
    fresh_x, fresh_y = embedded.parse_mnist5k()

    def boom():
        raise AssertionError("cache miss: parse_mnist5k called")

    monkeypatch.setattr(embedded, "parse_mnist5k", boom)
    x, y = embedded.mnist5k_arrays(cache)
    assert np.array_equal(x, fresh_x) and np.array_equal(y, fresh_y) and x.dtype == np.uint8


def test_env_var_cache_dir(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("LIRPA_DEQ_CACHE", str(tmp_path))
    x, y = embedded.mnist5k_arrays(cache)
    monkeypatch.setattr(embedded, "parse_mnist5k", lambda: (x, y))  # keep the test fast
    load_mnist5k("train")
    assert (tmp_path / "mnist5k_v1.npz").is_file()


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "wrong_shape", "empty"])
def test_corrupt_cache_rebuilt(tmp_path, cache, corruption, monkeypatch):
    good = (cache / "mnist5k_v1.npz")
    load_mnist5k("test", cache_dir=cache)
    if corruption != "truncated":  # one real re-parse is enough; the others reuse the parsed arrays
        arrays = embedded.mnist5k_arrays(cache)
        monkeypatch.setattr(embedded, "parse_mnist5k", lambda: arrays)
    path = tmp_path / "mnist5k_v1.npz"
    if corruption == "truncated":
        path.write_bytes(good.read_bytes()[:1000])
    elif corruption == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif corruption == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path, images=np.zeros((10, 784), np.uint8), labels=np.zeros(10, np.int64))
    with pytest.warns(UserWarning, match="invalid cache"):
        ds = load_mnist5k("test", cache_dir=tmp_path)
    ref = load_mnist5k("test", cache_dir=cache)
    assert torch.equal(ds.tensors[0], ref.tensors[0]) and torch.equal(ds.tensors[1], ref.tensors[1])
    assert embedded.mnist5k_arrays(tmp_path)[0].shape == (5000, 784)  # rebuilt file is valid now
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp leftovers


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist5k("val")


def test_digits8x8():
    tr, te = load_digits8x8("train"), load_digits8x8("test")
    assert tr.tensors[0].shape == (1437, 1, 8, 8) and te.tensors[0].shape == (360, 1, 8, 8)
    assert float(te.tensors[0].min()) >= 0 and float(te.tensors[0].max()) == 1.0
    assert torch.equal(torch.bincount(te.tensors[1]), torch.full((10,), 36))
    assert torch.equal(load_digits8x8("test").tensors[0], te.tensors[0])


# ----------------------------------------------------------------------------- local MNIST
def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(directory, n_train=7, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, n, dtype=np.uint8)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", lbls)):
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(directory / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (directory / name).write_bytes(data)
        out[prefix] = (imgs, lbls)
    return out


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("subdir", ["", "MNIST/raw"])
def test_local_mnist_native(tmp_path, gz, subdir):
    ref = _write_mnist(tmp_path / subdir if subdir else tmp_path, gz=gz)
    for split, key in (("train", "train"), ("test", "t10k")):
        ds = load_mnist(tmp_path, split, backend="native")
        x, y = ds.tensors
        assert x.shape == (len(ref[key][0]), 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x[:, 0] * 255, torch.from_numpy(ref[key][0]).float())
        assert torch.equal(y, torch.from_numpy(ref[key][1].astype(np.int64)))
    # 'auto' gives the same data whether or not torchvision is importable here
    assert torch.equal(load_mnist(tmp_path, "test").tensors[0], load_mnist(tmp_path, "test", backend="native").tensors[0])


def test_read_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    p.write_bytes(_idx_bytes(np.zeros((3, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match="header"):
        read_idx(p)


def test_missing_mnist_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path / "nowhere", "train", backend="native")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "MNIST" in msg and "never downloads" in msg


# ----------------------------------------------------------------------------- local CIFAR-10
def _write_cifar(directory, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data}, f, protocol=2)
        out[name] = (data, labels)
    return out


def test_local_cifar10_native(tmp_path):
    ref = _write_cifar(tmp_path / "cifar-10-batches-py")
    tr = load_cifar10(tmp_path, "train", backend="native")
    te = load_cifar10(tmp_path, "test", backend="native")
    assert tr.tensors[0].shape == (20, 3, 32, 32) and te.tensors[0].shape == (4, 3, 32, 32)
    exp = torch.from_numpy(ref["test_batch"][0].reshape(4, 3, 32, 32)).float() / 255
    assert torch.equal(te.tensors[0], exp)
    assert te.tensors[1].tolist() == ref["test_batch"][1]
    assert torch.equal(tr.tensors[1][:4], torch.tensor(ref["data_batch_1"][1]))


def test_cifar_refuses_malicious_pickle(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar(d)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar10(tmp_path, "test", backend="native")


def test_missing_cifar_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*never downloads"):
        load_cifar10(tmp_path, "train", backend="native")


# ----------------------------------------------------------------------------- torchvision path
def _fake_torchvision(calls):
    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append(("MNIST", root, train, download))
            self.data = torch.full((3, 28, 28), 255, dtype=torch.uint8)
            self.targets = torch.tensor([1, 2, 3])

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append(("CIFAR10", root, train, download))
            self.data = np.zeros((2, 32, 32, 3), np.uint8)
            self.data[..., 1] = 255  # channel 1 (green) saturated: checks HWC -> CHW
            self.targets = [4, 5]

    return types.SimpleNamespace(datasets=types.SimpleNamespace(MNIST=FakeMNIST, CIFAR10=FakeCIFAR10))


def test_torchvision_backend_used_without_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(local, "_import_torchvision", lambda: _fake_torchvision(calls))
    m = load_mnist(tmp_path, "test")
    assert m.tensors[0].shape == (3, 1, 28, 28) and float(m.tensors[0].min()) == 1.0
    c = load_cifar10(tmp_path, "train", backend="torchvision")
    assert c.tensors[0].shape == (2, 3, 32, 32)
    assert float(c.tensors[0][:, 1].min()) == 1.0 and float(c.tensors[0][:, [0, 2]].max()) == 0.0
    assert c.tensors[1].tolist() == [4, 5]
    assert [cl[3] for cl in calls] == [False, False]  # download=False always


def test_torchvision_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "_import_torchvision", lambda: None)
    with pytest.raises(ImportError, match="torchvision"):
        load_mnist(tmp_path, "test", backend="torchvision")
    _write_mnist(tmp_path)
    assert len(load_mnist(tmp_path, "test")) == 5  # auto falls back to the native reader


def test_real_torchvision_if_importable(tmp_path):
    if local._import_torchvision() is None:
        pytest.skip("torchvision does not import on this platform")
    _write_mnist(tmp_path / "MNIST" / "raw")
    assert len(load_mnist(tmp_path, "test")) == 5


# ----------------------------------------------------------------------------- registry
def test_registry(cache, monkeypatch):
    assert set(DATASETS) == {"mnist5k", "digits", "mnist", "cifar10"}
    assert dataset_info("cifar10").input_shape == (3, 32, 32) and dataset_info().name == "mnist5k"
    assert all(i.num_classes == 10 for i in DATASETS.values())
    with pytest.raises(ValueError, match="cifar10, digits, mnist, mnist5k"):
        get_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="data_root"):
        get_dataset("mnist", "test")
    monkeypatch.setenv("LIRPA_DEQ_CACHE", str(cache))
    ds = get_dataset(split="test")
    assert tuple(ds.tensors[0].shape[1:]) == dataset_info("mnist5k").input_shape
    assert tuple(get_dataset("digits", "test").tensors[0].shape[1:]) == (1, 8, 8)


def test_registry_local(tmp_path):
    _write_mnist(tmp_path)
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert get_dataset("mnist", "train", data_root=tmp_path).tensors[0].shape == (7, 1, 28, 28)
    assert get_dataset("cifar10", "test", data_root=tmp_path).tensors[0].shape == (4, 3, 32, 32)

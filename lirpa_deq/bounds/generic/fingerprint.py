"""What a trace freezes: a fingerprint of every non-parameter value a cell's forward may read.

auto_LiRPA traces a cell once; Python attributes (``self.skip = 0.3``), plain tensor attributes
and buffers become constants of the nested module, and a cached box depends on them too. A change
of any of them must rebuild the nested module and drop cached boxes. The fingerprint records, for
every submodule, its buffers and the public entries of its ``__dict__`` (numbers, strings, tuples,
tensors by value; other objects by identity). Parameters are not included: the nested module shares
them and the box cache keys on them already.
"""
from __future__ import annotations

import torch

_SIMPLE = (int, float, bool, str, complex, type(None))


def _freeze(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().clone())
    if isinstance(value, _SIMPLE):
        return ("value", value)
    if isinstance(value, (tuple, list)):
        return ("seq", tuple(_freeze(v) for v in value))
    return ("object", type(value).__name__, id(value))


def fingerprint(cell, with_parameters=False) -> list:
    """[(path, frozen value)] for every buffer and public attribute of every submodule of ``cell``
    (and every parameter when ``with_parameters``, for cells traced with weights as constants)."""
    items = []
    for prefix, module in cell.named_modules():
        for key, value in vars(module).items():
            if not key.startswith("_"):
                items.append((f"{prefix}.{key}", _freeze(value)))
        for key, value in module.named_buffers(recurse=False):
            items.append((f"{prefix}.{key}", _freeze(value)))
        if with_parameters:
            for key, value in module.named_parameters(recurse=False):
                items.append((f"{prefix}.{key}", _freeze(value)))
    return items


def _equal(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        x, y = a[1], b[1]
        return x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
    if a[0] == "seq":
        return len(a[1]) == len(b[1]) and all(_equal(u, v) for u, v in zip(a[1], b[1]))
    return a[1:] == b[1:]


def same_fingerprint(a, b) -> bool:
    """Whether two fingerprints record the same values."""
    return a is not None and b is not None and len(a) == len(b) and all(
        pa == pb and _equal(va, vb) for (pa, va), (pb, vb) in zip(a, b))

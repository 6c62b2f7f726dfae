"""Small helpers shared by the solver implementations (argument checks, batched dot products)."""
from __future__ import annotations

import numbers

import torch


def check_common(tol, max_iter) -> None:
    """Reject meaningless stopping criteria early, with the offending value in the message."""
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a real number >= 0, got {tol!r}")
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def check_shape(z0: torch.Tensor, fz: torch.Tensor) -> None:
    if fz.shape != z0.shape:
        raise ValueError(f"the map must preserve shape: got f(z0).shape={tuple(fz.shape)} "
                         f"for z0.shape={tuple(z0.shape)}")


def bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two ``(B, ...)`` tensors, shape ``(B,)``."""
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def bscale(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply sample ``i`` of ``x`` ``(B, ...)`` by ``c[i]`` (``c`` of shape ``(B,)``)."""
    return c.view((-1,) + (1,) * (x.dim() - 1)) * x

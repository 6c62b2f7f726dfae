"""The one floating-point rounding model of lirpa_deq's proofs (Higham, "Accuracy and Stability of
Numerical Algorithms", 2002, ch. 3).

With unit roundoff u = finfo(dtype).eps (a safe over-estimate of eps / 2):

* a dot product of n terms computed in floating point errs by at most gamma_n sum|terms|,
  gamma_n = n u / (1 - n u) (:func:`gamma`);
* :func:`dot_error` uses the simpler (n + 8) u sum|terms| (the + 8 covers the few additions and
  multiplications around the dot product, e.g. centre / radius forms, and n u << 1), plus the
  smallest normal number against underflow.

Every proof that compares computed quantities (post-fixpoint checks, ball radii, nested interval
passes) widens them by one of these.
"""
from __future__ import annotations

import torch


def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps


def gamma(n, dtype) -> float:
    """gamma_n = n u / (1 - n u); raises when n u >= 1 (no bound)."""
    nu = n * unit_roundoff(dtype)
    if not nu < 1:
        raise ValueError(f"no rounding bound for dot products of {n} terms in {dtype}")
    return nu / (1 - nu)


def dot_error(n, magnitude, dtype=None):
    """Bound on the rounding error of a computed dot product of ``n`` terms whose absolute values sum
    to at most ``magnitude`` (a tensor or float): (n + 8) u magnitude + tiny."""
    dtype = dtype or (magnitude.dtype if isinstance(magnitude, torch.Tensor) else torch.float64)
    info = torch.finfo(dtype)
    return (n + 8) * info.eps * magnitude + info.tiny

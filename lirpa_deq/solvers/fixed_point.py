"""Damped fixed-point (Picard) iteration ``z <- (1 - beta) z + beta f(z)``."""
from __future__ import annotations

import torch

from ._common import check_common, check_shape
from .stats import Tracker, batch_mask, per_sample_residual


def fixed_point_iter(f, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 50,
                     damping: float = 1.0):
    """Solve ``z = f(z)`` by damped Picard iteration.

    f: batched map, tensor ``(B, ...)`` -> same shape. z0: warm start ``(B, ...)``.
    damping: ``beta`` in (0, 1]; converges whenever ``f`` is a contraction (and for
    ``beta < 1`` also for averaged nonexpansive maps).
    Returns ``(z, SolverStats)``; ``z`` is, per sample, the lowest-residual iterate.
    Converged samples are frozen. Differentiable (no in-place ops) for unrolled training.
    """
    check_common(tol, max_iter)
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    tr = Tracker(tol, "fixed_point_iter")
    z = z0
    fz = f(z)
    check_shape(z0, fz)
    tr.observe(z, per_sample_residual(z, fz))
    while not tr.done() and tr.iterations < max_iter:
        z_new = fz if damping == 1 else (1 - damping) * z + damping * fz
        z = torch.where(batch_mask(tr.active, z), z_new, z)
        tr.iterations += 1
        fz = f(z)
        tr.observe(z, per_sample_residual(z, fz))
    return tr.result()

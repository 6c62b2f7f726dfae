"""Convergence bookkeeping shared by every solver.

The residual of a state ``z`` (shape ``(B, ...)``) for a map ``f`` is, per sample,
``||f(z) - z||_2 / (||z||_2 + eps)``; a sample has converged when it is ``<= tol``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Added to ``||z||`` so that the residual of the fixed point ``z* = 0`` is finite (and 0).
RESIDUAL_EPS = 1e-8


@dataclass
class SolverStats:
    """What a solve achieved. ``residual`` and ``per_sample_residual`` are those of the
    *returned* iterate (never of an earlier one), so ``converged`` is an honest statement.

    iterations: solver updates performed (0 when ``z0`` already satisfied ``tol``).
    residual: max over the batch of the per-sample relative residual.
    converged: every sample reached ``tol``.
    per_sample_residual: tensor of shape ``(B,)`` (detached).
    solver: registry name of the solver that produced these stats.
    """

    iterations: int
    residual: float
    converged: bool
    per_sample_residual: torch.Tensor = field(repr=False)
    solver: str = ""
    tol: float = float("nan")


def per_sample_residual(z: torch.Tensor, fz: torch.Tensor, eps: float = RESIDUAL_EPS) -> torch.Tensor:
    """``||fz - z|| / (||z|| + eps)`` per sample, shape ``(B,)``, detached (never part of a graph)."""
    z, fz = z.detach(), fz.detach()
    diff = (fz - z).flatten(1).norm(dim=1)
    return diff / (z.flatten(1).norm(dim=1) + eps)


def batch_mask(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample boolean ``(B,)`` so that it broadcasts against ``like`` ``(B, ...)``."""
    return flags.view((-1,) + (1,) * (like.dim() - 1))


class Tracker:
    """Keeps, per sample, the lowest-residual iterate seen so far and which samples converged.

    Solvers call :meth:`observe` after every evaluation of ``f``; converged samples are then
    frozen by the solver (``active`` is False for them), so warm starts at a fixed point cost
    nothing and a sample's returned value never gets worse than its best iterate.
    """

    def __init__(self, tol: float, name: str):
        self.tol, self.name = float(tol), name
        self.best = None
        self.best_res = None
        self.iterations = 0

    def observe(self, z: torch.Tensor, res: torch.Tensor) -> None:
        # NaN residuals (a diverged sample) must never replace a finite best.
        res = torch.where(torch.isnan(res), torch.full_like(res, float("inf")), res)
        if self.best is None:
            self.best, self.best_res = z, res
            return
        better = res < self.best_res
        self.best = torch.where(batch_mask(better, z), z, self.best)
        self.best_res = torch.where(better, res, self.best_res)

    @property
    def active(self) -> torch.Tensor:
        """Samples not yet converged, shape ``(B,)``."""
        return ~(self.best_res <= self.tol)

    def done(self) -> bool:
        return bool((self.best_res <= self.tol).all())

    def result(self):
        res = self.best_res
        stats = SolverStats(
            iterations=self.iterations,
            residual=float(res.max()) if res.numel() else 0.0,
            converged=self.done(),
            per_sample_residual=res,
            solver=self.name,
            tol=self.tol,
        )
        return self.best, stats

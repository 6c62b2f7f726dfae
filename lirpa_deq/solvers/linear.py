"""Linear solves used by Peaceman-Rachford: the resolvent ``V = ((1 + a) I - a L0)^-1``.

Dense operators (fully connected cells): one explicit inverse per solve, exact up to rounding.
Matrix-free operators (zero-padded conv cells): CG on the normal equations (CGNR). A circular
FFT diagonalisation would be exact only for circular padding, not for our zero padding, so we
solve to a relative residual ``cg_tol`` instead, warm-started from the previous PR iterate.
CGNR only needs ``K`` and ``K^T`` and converges for any nonsingular ``K``; here the symmetric
part of ``K`` is ``>= (1 + a m) I`` so ``K`` is well conditioned.
"""
from __future__ import annotations

import torch

from ._common import bdot, bscale


def dense_resolvent(L0: torch.Tensor, alpha: float):
    """Return ``apply(rhs, x0=None)`` computing ``((1 + a) I - a L0)^-1 rhs`` for ``rhs (B, ...)``."""
    N = L0.shape[0]
    K = (1 + alpha) * torch.eye(N, dtype=L0.dtype, device=L0.device) - alpha * L0
    Kinv_t = torch.linalg.inv(K).transpose(0, 1)

    def apply(rhs, x0=None, call_tol=None):
        return (rhs.reshape(rhs.shape[0], -1) @ Kinv_t).view_as(rhs)

    return apply


def cgnr(apply_K, apply_KT, b: torch.Tensor, x0: torch.Tensor, *, tol: float, max_iter: int):
    """Solve ``K x = b`` per sample by conjugate gradients on ``K^T K x = K^T b``.

    b, x0: ``(B, ...)``; tol: float or per-sample tensor ``(B,)``.
    Stops when ``||b - K x|| <= tol ||b||`` for every sample or after
    ``max_iter`` iterations; converged samples stop moving. Returns ``x`` (no stats: PR checks
    its own fixed-point residual, which is what matters).
    """
    x = x0
    r = b - apply_K(x)
    bnorm = b.flatten(1).norm(dim=1)
    s = apply_KT(r)
    p, gamma = s, bdot(s, s)
    for _ in range(max_iter):
        done = r.detach().flatten(1).norm(dim=1) <= tol * bnorm.detach()
        if bool(done.all()):
            break
        q = apply_K(p)
        qq = bdot(q, q)
        step = torch.where(done | (qq <= 0), torch.zeros_like(qq), gamma / torch.where(qq > 0, qq, torch.ones_like(qq)))
        x = x + bscale(step, p)
        r = r - bscale(step, q)
        s = apply_KT(r)
        gamma_new = bdot(s, s)
        beta = torch.where(gamma > 0, gamma_new / torch.where(gamma > 0, gamma, torch.ones_like(gamma)), torch.zeros_like(gamma))
        p = s + bscale(beta, p)
        gamma = gamma_new
    return x


def iterative_resolvent(lin0, lin0_t, alpha: float, *, tol: float, max_iter: int):
    """Matrix-free resolvent via :func:`cgnr`; ``apply(rhs, x0, tol)`` warm-starts from ``x0``
    and may loosen the relative tolerance for one call (inexact outer iterations)."""

    def K(x):
        return (1 + alpha) * x - alpha * lin0(x)

    def KT(x):
        return (1 + alpha) * x - alpha * lin0_t(x)

    def apply(rhs, x0=None, call_tol=None):
        t = tol if call_tol is None else torch.as_tensor(call_tol).clamp(min=tol)
        return cgnr(K, KT, rhs, rhs / (1 + alpha) if x0 is None else x0, tol=t, max_iter=max_iter)

    return apply

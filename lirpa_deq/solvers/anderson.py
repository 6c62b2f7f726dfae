"""Anderson acceleration (type II) for batched fixed-point problems ``z = f(z)``."""
from __future__ import annotations

import torch

from ._common import check_common, check_shape
from .stats import Tracker, batch_mask, per_sample_residual


def _mixing_weights(G: torch.Tensor, lam: float) -> torch.Tensor:
    """Per sample, ``argmin ||G^T alpha||`` subject to ``sum(alpha) = 1``.

    G: residual history ``(B, k, N)``. Solved through the regularised normal equations
    ``(G G^T + lam * s I) a = 1``, ``alpha = a / sum(a)``; ``s`` is the mean diagonal of
    ``G G^T`` so that the regularisation is scale free. Returns ``(B, k)``.
    """
    H = G @ G.transpose(1, 2)
    k = H.shape[-1]
    scale = H.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(H.dtype).tiny)
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    H = H + (lam * scale).view(-1, 1, 1) * eye
    a = torch.linalg.solve(H, torch.ones_like(H[..., :1]))[..., 0]
    s = a.sum(dim=1, keepdim=True)
    # A vanishing sum means a degenerate history: fall back to the latest iterate.
    fallback = torch.zeros_like(a)
    fallback[:, -1] = 1
    ok = s.abs() > torch.finfo(a.dtype).eps
    return torch.where(ok, a / torch.where(ok, s, torch.ones_like(s)), fallback)


def anderson(f, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 50, m: int = 5,
             lam: float = 1e-4, damping: float = 1.0):
    """Solve ``z = f(z)`` with Anderson acceleration.

    f: batched map ``(B, ...)`` -> same shape. z0: warm start.
    m: history length (>= 1; m = 1 is damped Picard). lam: relative Tikhonov regularisation
    of the least-squares mixing problem. damping: ``beta`` in (0, 1]; the new iterate is
    ``beta * sum(alpha F) + (1 - beta) * sum(alpha X)``.
    Returns ``(z, SolverStats)`` (lowest-residual iterate per sample; converged samples frozen).
    No in-place updates of tensors that may need grad, so it can be unrolled.
    """
    check_common(tol, max_iter)
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"anderson memory m must be an integer >= 1, got {m!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    tr = Tracker(tol, "anderson")
    B = z0.shape[0]
    z = z0
    fz = f(z)
    check_shape(z0, fz)
    tr.observe(z, per_sample_residual(z, fz))
    X, F = [], []  # histories as lists: stacking keeps autograd happy (no in-place writes)
    while not tr.done() and tr.iterations < max_iter:
        X.append(z.reshape(B, -1))
        F.append(fz.reshape(B, -1))
        if len(X) > m:
            X.pop(0)
            F.pop(0)
        Xs, Fs = torch.stack(X, 1), torch.stack(F, 1)
        alpha = _mixing_weights(Fs - Xs, lam)
        mixed_f = (alpha.unsqueeze(1) @ Fs).squeeze(1)
        if damping == 1:
            z_new = mixed_f
        else:
            z_new = damping * mixed_f + (1 - damping) * (alpha.unsqueeze(1) @ Xs).squeeze(1)
        z_new = z_new.view_as(z)
        z = torch.where(batch_mask(tr.active, z), z_new, z)
        tr.iterations += 1
        fz = f(z)
        tr.observe(z, per_sample_residual(z, fz))
    return tr.result()

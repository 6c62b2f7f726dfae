"""Anderson acceleration (type II) for batched fixed-point problems ``z = f(z)``."""
from __future__ import annotations

import torch

from ._common import check_common, check_shape
from .stats import Tracker, batch_mask, per_sample_residual


def _mixing_weights(G: torch.Tensor, lam: float, latest: int = -1) -> torch.Tensor:
    """Per sample, ``argmin ||G^T alpha||`` subject to ``sum(alpha) = 1``.

    G: residual history ``(B, k, N)``. Solved through the regularised normal equations
    ``(G G^T + lam * s I) a = 1``, ``alpha = a / sum(a)``; ``s`` is the mean diagonal of
    ``G G^T`` so that the regularisation is scale free. ``latest``: index of the newest entry
    (the fallback when the history is degenerate). Returns ``(B, k)``.
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
    fallback[:, latest] = 1
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
    Without autograd the history lives in preallocated ring buffers (the LSQ problem does not
    depend on the order of the entries); with autograd it is a list that is stacked each step,
    so nothing saved for backward is modified in place and the solve can be unrolled.
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
    hist = _History(m, differentiable=torch.is_grad_enabled())
    while not tr.done() and tr.iterations < max_iter:
        hist.push(z.reshape(B, -1), fz.reshape(B, -1))
        Xs, Fs, G, latest = hist.view()
        alpha = _mixing_weights(G, lam, latest).unsqueeze(1)  # (B, 1, k)
        z_new = torch.bmm(alpha, Fs).squeeze(1)
        if damping != 1:
            z_new = damping * z_new + (1 - damping) * torch.bmm(alpha, Xs).squeeze(1)
        z_new = z_new.view_as(z)
        z = torch.where(batch_mask(tr.active, z), z_new, z)
        tr.iterations += 1
        fz = f(z)
        tr.observe(z, per_sample_residual(z, fz))
    return tr.result()


class _History:
    """The last ``m`` pairs ``(x, f(x))`` (flattened ``(B, N)``) and residuals ``f(x) - x``."""

    def __init__(self, m: int, differentiable: bool):
        self.m, self.diff, self.count = m, differentiable, 0
        self.X, self.F, self.G = [], [], []

    def push(self, x, fx):
        if self.diff:
            self.X.append(x)
            self.F.append(fx)
            if len(self.X) > self.m:
                self.X.pop(0)
                self.F.pop(0)
        else:
            if self.count == 0:
                shape = (x.shape[0], self.m, x.shape[1])
                self.X, self.F, self.G = x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)
            slot = self.count % self.m
            self.X[:, slot] = x
            self.F[:, slot] = fx
            torch.sub(fx, x, out=self.G[:, slot])
        self.count += 1

    def view(self):
        """``(X, F, G, latest)`` with ``(B, k, N)`` tensors and the newest entry's index."""
        if self.diff:
            Xs, Fs = torch.stack(self.X, 1), torch.stack(self.F, 1)
            return Xs, Fs, Fs - Xs, -1
        k = min(self.count, self.m)
        return self.X[:, :k], self.F[:, :k], self.G[:, :k], (self.count - 1) % self.m

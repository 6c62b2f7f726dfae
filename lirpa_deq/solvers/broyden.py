"""Limited-memory ("good") Broyden method on the residual ``g(z) = f(z) - z``."""
from __future__ import annotations

import torch

from ._common import bdot, bscale, check_common, check_shape
from .stats import Tracker, batch_mask, per_sample_residual


class _InverseJacobian:
    """``Binv = -I + sum_i u_i v_i^T`` per sample; factors ``U, V`` of shape ``(B, k, N)``.

    Starting from ``-I`` makes the first step a plain fixed-point step. The sum does not depend
    on the order of the pairs, so without autograd the factors live in preallocated ring
    buffers (the oldest pair is overwritten: limited memory); with autograd they are grown by
    ``cat`` instead, because in-place writes would invalidate tensors saved for backward.
    """

    def __init__(self, memory: int):
        self.memory, self.U, self.V, self.count = memory, None, None, 0

    def _factors(self):
        k = min(self.count, self.memory)
        return self.U[:, :k], self.V[:, :k]

    def mv(self, x):      # Binv x
        if self.count == 0:
            return -x
        U, V = self._factors()
        return -x + torch.einsum("bk,bkn->bn", torch.einsum("bkn,bn->bk", V, x), U)

    def rmv(self, x):     # Binv^T x   (i.e. x^T Binv)
        if self.count == 0:
            return -x
        U, V = self._factors()
        return -x + torch.einsum("bk,bkn->bn", torch.einsum("bkn,bn->bk", U, x), V)

    def update(self, s, y):
        """Rank-one update making ``Binv y = s`` (secant condition); skipped where ill-posed."""
        vT = self.rmv(s)
        Binv_y = self.mv(y)
        denom = bdot(vT, y)
        ok = denom.abs() > 1e-12 * (bdot(s, s).sqrt() * bdot(y, y).sqrt()).clamp_min(1e-30)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u = bscale(ok.to(s.dtype) / safe, s - Binv_y)
        if torch.is_grad_enabled() and (u.requires_grad or vT.requires_grad):
            keep = self.memory - 1
            if self.count == 0:
                self.U, self.V = u.unsqueeze(1), vT.unsqueeze(1)
            else:
                self.U = torch.cat([self.U[:, self.U.shape[1] - keep:] if keep else self.U[:, :0], u.unsqueeze(1)], 1)
                self.V = torch.cat([self.V[:, self.V.shape[1] - keep:] if keep else self.V[:, :0], vT.unsqueeze(1)], 1)
        else:
            if self.U is None:
                self.U = u.new_zeros((u.shape[0], self.memory, u.shape[1]))
                self.V = torch.zeros_like(self.U)
            slot = self.count % self.memory
            self.U[:, slot] = u
            self.V[:, slot] = vT
        self.count += 1


def broyden(f, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 50, memory: int = 30,
            step: float = 1.0):
    """Solve ``z = f(z)`` with a limited-memory good-Broyden quasi-Newton method.

    f: batched map ``(B, ...)`` -> same shape. z0: warm start.
    memory: number of rank-one updates kept. step: fixed step length along the quasi-Newton
    direction (no line search, as in TorchDEQ's default). Returns ``(z, SolverStats)``; the
    per-sample lowest-residual iterate is returned because Broyden is not monotone.
    """
    check_common(tol, max_iter)
    if not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"broyden memory must be an integer >= 1, got {memory!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    tr = Tracker(tol, "broyden")
    shape, B = z0.shape, z0.shape[0]
    z = z0
    fz = f(z)
    check_shape(z0, fz)
    tr.observe(z, per_sample_residual(z, fz))
    x, gx = z.reshape(B, -1), (fz - z).reshape(B, -1)
    Binv = _InverseJacobian(memory)
    while not tr.done() and tr.iterations < max_iter:
        dx = -step * Binv.mv(gx)
        dx = torch.where(batch_mask(tr.active, dx), dx, torch.zeros_like(dx))
        x_new = x + dx
        z = x_new.view(shape)
        tr.iterations += 1
        fz = f(z)
        tr.observe(z, per_sample_residual(z, fz))
        g_new = (fz - z).reshape(B, -1)
        Binv.update(x_new - x, g_new - gx)
        x, gx = x_new, g_new
    return tr.result()

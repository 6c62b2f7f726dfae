"""Limited-memory ("good") Broyden method on the residual ``g(z) = f(z) - z``."""
from __future__ import annotations

import torch

from ._common import bdot, bscale, check_common, check_shape
from .stats import Tracker, batch_mask, per_sample_residual


class _InverseJacobian:
    """``Binv = -I + sum_i u_i v_i^T`` per sample, stored as low-rank factors ``(B, N)``.

    Starting from ``-I`` makes the first step a plain fixed-point step.
    """

    def __init__(self, memory: int):
        self.memory, self.us, self.vs = memory, [], []

    def mv(self, x):      # Binv x
        out = -x
        for u, v in zip(self.us, self.vs):
            out = out + bscale(bdot(v, x), u)
        return out

    def rmv(self, x):     # Binv^T x   (i.e. x^T Binv)
        out = -x
        for u, v in zip(self.us, self.vs):
            out = out + bscale(bdot(u, x), v)
        return out

    def update(self, s, y):
        """Rank-one update making ``Binv y = s`` (secant condition); skipped where ill-posed."""
        vT = self.rmv(s)
        Binv_y = self.mv(y)
        denom = bdot(vT, y)
        ok = denom.abs() > 1e-12 * (bdot(s, s).sqrt() * bdot(y, y).sqrt()).clamp_min(1e-30)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u = bscale(ok.to(s.dtype) / safe, s - Binv_y)
        self.us.append(u)
        self.vs.append(vT)
        if len(self.us) > self.memory:  # limited memory: forget the oldest pair
            self.us.pop(0)
            self.vs.pop(0)


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

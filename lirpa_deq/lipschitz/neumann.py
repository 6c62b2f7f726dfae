"""Proven Neumann-series bounds for the nonnegative operator ``A = Dbar |W|^T``.

``A v = dbar * absWT(v)`` with ``dbar`` in {0, 1} (1 where a DEQ neuron can be active anywhere in
the region) and ``absWT`` the cell operator's ``|W|^T`` (an entrywise upper bound is fine: every
statement below is monotone in A). Every application is rounded UP by the factor ``1 + gamma``
(gamma covers the floating-point error of a sum of ``fan`` nonnegative terms), so the computed
vectors dominate the exact ones.

* ``rho_direction``: a vector ``v >= 1`` with ``A v <= v - 1/2``. For a nonnegative A this
  PROVES ``rho(A) <= max_i (A v)_i / v_i < 1`` (Collatz-Wielandt), hence for every diagonal
  ``D`` with ``0 <= D <= Dbar``: ``rho(D W^T) <= rho(|D W^T|) <= rho(A) < 1``.
* ``neumann_bound``: for ``b >= 0``, a vector ``M >= 0`` with ``b + A M <= M``. Then every partial
  sum ``sum_{k<K} A^k b <= M - A^K M <= M``, so ``(I - A)^-1 b = sum_k A^k b <= M``.
  It is found by iterating ``M <- b + A M`` and inflating along ``v``: if ``M`` has residual
  ``res = b + A M - M``, then ``M + t v`` with ``t >= 2 max(res)`` satisfies the inequality, since
  ``A (t v) <= t v - t/2``. The inequality is checked, never assumed.
* ``nonneg_power_step``: one application of A (rounded up), for the truncation tail ``A^K M``.
"""
from __future__ import annotations

import torch

from .layers import gamma


def state_fan(state_shape):
    """Terms per output of ``|W|^T g`` (as ``interval.rounding_slack``: n for fc, 25 C for conv)."""
    return state_shape[0] if len(state_shape) == 1 else 25 * state_shape[0] + 8


class NonnegOp:
    """``A v = dbar * absWT(v) * (1 + gamma)`` on batches shaped like ``dbar`` (rows may be a
    multiple of ``dbar``'s batch: ``dbar`` is repeated ``rows // B`` times per sample)."""

    def __init__(self, op, dbar, state_shape):
        self.op, self.dbar = op, dbar
        self.up = 1 + gamma(dbar.dtype, state_fan(tuple(state_shape)))

    def dbar_for(self, n_rows):
        B = self.dbar.shape[0]
        return self.dbar if n_rows == B else self.dbar.repeat_interleave(n_rows // B, 0)

    def __call__(self, v):
        return self.dbar_for(v.shape[0]) * self.op.absWT(v) * self.up


def _rowmax(t):
    return t.flatten(1).max(1).values


@torch.no_grad()
def rho_direction(A: NonnegOp, iters: int = 3000, growth_limit: float = 1e12):
    """(v, ok): ``v >= 1`` of dbar's shape and a per-sample bool ``ok`` that is True exactly where
    ``A v <= v - 1/2`` was VERIFIED (so ``rho(A) < 1`` for that sample)."""
    one = torch.ones_like(A.dbar)
    v = one
    dead = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    view = (-1,) + (1,) * (v.dim() - 1)
    tol = 16 * torch.finfo(v.dtype).eps
    for _ in range(iters):
        v_new = one + A(v)
        dead |= ~torch.isfinite(v_new).flatten(1).all(1) | (_rowmax(v_new) > growth_limit)
        v_new = torch.where(dead.view(view), one, v_new)
        conv = _rowmax((v_new - v).abs()) <= tol * _rowmax(v_new)
        v = v_new
        if bool((conv | dead).all()):
            break
    ok = (A(v) <= v - 0.5).flatten(1).all(1) & ~dead
    return v, ok


@torch.no_grad()
def neumann_bound(A: NonnegOp, b: torch.Tensor, v: torch.Tensor, iters: int = 3000,
                  retries: int = 6):
    """(M, ok): ``M >= 0`` with ``b + A M <= M`` VERIFIED per row where ``ok`` (rows of ``b``;
    ``v`` is per sample, repeated). Rows that fail get ``M = inf``. Requires ``b >= 0``."""
    n = b.shape[0]
    vr = v if v.shape[0] == n else v.repeat_interleave(n // v.shape[0], 0)
    view = (-1,) + (1,) * (b.dim() - 1)
    tol = 4 * torch.finfo(b.dtype).eps
    M = b.clone()
    for _ in range(iters):
        M_new = b + A(M)
        done = bool((_rowmax((M_new - M).abs()) <= tol * _rowmax(M_new).clamp_min(1e-300)).all())
        M = M_new
        if done or not torch.isfinite(M).all():
            break
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    res = _rowmax((b + A(M) - M).clamp_min(0))
    t = 2 * res + 8 * torch.finfo(b.dtype).eps * (1 + _rowmax(M))
    out = torch.full_like(M, float("inf"))
    ok = torch.zeros(n, dtype=torch.bool, device=b.device)
    for _ in range(retries):
        M2 = M + t.view(view) * vr
        good = (b + A(M2) <= M2).flatten(1).all(1) & torch.isfinite(M2).flatten(1).all(1) & ~ok
        out[good] = M2[good]
        ok |= good
        if bool(ok.all()):
            break
        t = t * 10
    return out, ok

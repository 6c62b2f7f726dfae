"""Anderson acceleration with per-row stopping and batch compaction.

:func:`compacting_anderson` solves a batch of independent fixed-point problems ``z = f_i(z)``
(one per row) with Anderson acceleration, and lets the caller *stop* rows one by one: the first
iteration at which a caller-supplied test accepts a row (or its residual is small, or the
iteration budget is spent) fixes that row's result, and rows that have stopped are removed from
the batch -- together with their Anderson history -- so that later iterations only pay for the
rows still running.  It is the solver of the agreement-certified smoothing pass
(:mod:`lirpa_deq.smoothing.fused`), where the per-row test is a label-certifiability check.

The mixing problem is that of :func:`lirpa_deq.solvers.anderson.anderson` (regularised normal
equations of ``argmin ||G^T alpha||`` subject to ``sum(alpha) = 1``), but the Gram matrix
``G G^T`` is kept and updated by one row / column per iteration instead of being recomputed
(a batched ``(k, N) x (N, k)`` product costs as much as a cheap operator application).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from ._common import check_common

__all__ = ["compacting_anderson", "CompactingResult"]


@dataclass
class CompactingResult:
    """What :func:`compacting_anderson` returns (``B`` rows in the original order).

    outputs: tuple of ``(B, ...)`` tensors: for each row, the ``outputs`` the stop callback
        returned for it at the iteration where the row stopped (never overwritten afterwards).
    stop_iter: ``(B,)`` int64, the iteration at which each row stopped (``>= min_iter``).
    map_at_min_iter: ``(B, N)``, ``f(z_{min_iter})`` for every row (all rows are still running
        then), or None unless asked for with ``keep_map_at_min_iter``.
    iterations: Anderson updates performed on the (shrinking) batch.
    row_iterations: sum over those updates of the number of rows in the batch (the work done).
    """

    outputs: Tuple[torch.Tensor, ...]
    stop_iter: torch.Tensor
    map_at_min_iter: Optional[torch.Tensor]
    iterations: int
    row_iterations: int


def gram_mixing_weights(H: torch.Tensor, k: int, lam: float, latest: int) -> torch.Tensor:
    """Anderson weights from a Gram matrix: per row, ``argmin ||G^T a||`` s.t. ``sum(a) = 1``.

    H: ``(R, m, m)`` with ``H[:, :k, :k] = G G^T`` for the ``k`` valid history entries. Solved
    through ``(G G^T + lam * s I) a = 1``, ``a / sum(a)``, ``s`` the mean diagonal (scale free);
    a degenerate history (vanishing ``sum(a)``) falls back to the entry ``latest``. Returns
    ``(R, k)``.
    """
    if k == 1:
        return H.new_ones((H.shape[0], 1))
    Hk = H[:, :k, :k]
    scale = Hk.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(H.dtype).tiny)
    Hk = Hk + (lam * scale).view(-1, 1, 1) * torch.eye(k, dtype=H.dtype, device=H.device)
    a = torch.linalg.solve(Hk, torch.ones_like(Hk[..., :1]))[..., 0]
    s = a.sum(dim=1, keepdim=True)
    ok = s.abs() > torch.finfo(a.dtype).eps
    fallback = torch.zeros_like(a)
    fallback[:, latest] = 1
    return torch.where(ok, a / torch.where(ok, s, torch.ones_like(s)), fallback)


def _check_options(m, lam, damping, min_iter, max_iter, tol):
    check_common(tol, max_iter)
    if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
        raise ValueError(f"anderson memory m must be an integer >= 1, got {m!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    if not (isinstance(min_iter, int) and not isinstance(min_iter, bool) and min_iter >= 0):
        raise ValueError(f"min_iter must be an integer >= 0, got {min_iter!r}")


def compacting_anderson(step: Callable, z0: torch.Tensor, stop_rows: Callable, *,
                        row_args: Sequence[torch.Tensor] = (), min_iter: int = 0, max_iter: int = 50,
                        tol: float = 0.0, m: int = 5, lam: float = 1e-4, damping: float = 1.0,
                        keep_map_at_min_iter: bool = False) -> CompactingResult:
    """Anderson acceleration on ``B`` independent rows with per-row stopping and compaction.

    Shapes: ``z0`` is ``(B, N)`` (flat states); every tensor in ``row_args`` is ``(B, ...)``
    (per-row data of the map, e.g. the injection ``u``), kept aligned with the running rows.

    step(z, *row_args) -> (fz, aux): the map on the ``R`` running rows, ``z`` and ``fz`` of
        shape ``(R, N)``; ``aux`` is anything the stop callback needs (e.g. the pre-activation,
        so that it is not recomputed). Row ``i`` of ``fz`` must depend on row ``i`` only.
    stop_rows(it, z, aux) -> (accept, outputs): called at every iteration ``it >= min_iter`` on
        the current iterates ``z`` ``(R, N)`` (with ``aux`` from ``step(z)``); ``accept`` ``(R,)``
        bool: the caller's request to stop a row; ``outputs``: tuple of ``(R, ...)`` tensors,
        recorded for the rows that stop now.

    Stopping a row: at iteration ``it >= min_iter``, a running row stops when ``accept`` is True,
    when its relative residual ``||f(z) - z|| / (||z|| + 1e-8) <= tol``, or when
    ``it >= max_iter`` (then every running row stops). Its ``outputs`` at that iteration and
    ``it`` are recorded and never changed again. A stopped row is carried along (its iterate
    is not recorded any more) until at most three quarters of the batch are still running;
    then stopped rows, their ``row_args`` and their Anderson history are dropped. The mixing is
    per row, so carried rows do not influence running ones. The solve ends when every row has
    stopped; each row runs at most ``max(min_iter, max_iter)`` iterations.

    Options: ``m`` (history length, ``m = 1`` is damped Picard iteration), ``lam`` (relative
    Tikhonov regularisation of the mixing problem), ``damping`` ``beta`` in (0, 1]: the new
    iterate is ``beta * sum(alpha F) + (1 - beta) * sum(alpha X)``. Runs without autograd
    bookkeeping in mind: the history lives in ring buffers updated in place.
    """
    _check_options(m, lam, damping, min_iter, max_iter, tol)
    B = z0.shape[0]
    dev = z0.device
    z, args = z0, tuple(row_args)
    outputs = None
    stop_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    rows = torch.arange(B, device=dev)                       # running row -> original row
    live = torch.ones(B, dtype=torch.bool, device=dev)
    F = G = H = X = None
    count, it, n_done, kept, iterations, row_iterations = 0, 0, 0, None, 0, 0
    fz, aux = step(z, *args)
    while True:
        g = fz - z
        if it == min_iter and keep_map_at_min_iter:
            kept = fz.clone()
        if it >= min_iter:
            accept, outs = stop_rows(it, z, aux)
            if outputs is None:
                outputs = tuple(o.new_empty((B, *o.shape[1:])) for o in outs)
            if it >= max_iter:
                done = live
            else:
                res = g.norm(dim=1) / (z.norm(dim=1) + 1e-8)
                done = live & (accept | (res <= tol))
            sel = done.nonzero().flatten()  # (integer indices: boolean masks are slow on CPU)
            n_live = live.numel() - n_done - sel.numel()
            if sel.numel():
                tgt = rows.index_select(0, sel)
                for buf, o in zip(outputs, outs):
                    buf.index_copy_(0, tgt, o.index_select(0, sel))
                stop_iter[tgt] = it
                live = live & ~done
                n_done += sel.numel()
                if n_live > 0 and 4 * n_live <= 3 * live.numel():  # <= 3/4 running: compact
                    keep = live.nonzero().flatten()
                    rows, z, fz, g = (t.index_select(0, keep) for t in (rows, z, fz, g))
                    args = tuple(t.index_select(0, keep) for t in args)
                    if F is not None:
                        F, G, H = (t.index_select(0, keep) for t in (F, G, H))
                        X = None if X is None else X.index_select(0, keep)
                    live = torch.ones(keep.numel(), dtype=torch.bool, device=dev)
                    n_done = 0
            if n_live == 0:
                break
        if F is None:
            F, G = (z.new_empty((z.shape[0], m, z.shape[1])) for _ in range(2))
            H = z.new_zeros((z.shape[0], m, m))
            X = None if damping == 1 else torch.empty_like(F)
        slot = count % m
        F[:, slot], G[:, slot] = fz, g
        if X is not None:
            X[:, slot] = z
        count += 1
        k = min(count, m)
        h = (G[:, :k] * g[:, None, :]).sum(-1)                # new row / column of G G^T
        H[:, slot, :k] = h
        H[:, :k, slot] = h
        alpha = gram_mixing_weights(H, k, lam, slot).unsqueeze(1)
        z = torch.bmm(alpha, F[:, :k]).squeeze(1)
        if X is not None:
            z = damping * z + (1 - damping) * torch.bmm(alpha, X[:, :k]).squeeze(1)
        fz, aux = step(z, *args)
        it += 1
        iterations += 1
        row_iterations += z.shape[0]
    return CompactingResult(outputs, stop_iter, kept, iterations, row_iterations)

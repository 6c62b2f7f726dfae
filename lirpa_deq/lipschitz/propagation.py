"""``elementwise`` and ``local``: region-dependent bounds by backward propagation of gradient rows.

Both start from the specification rows at the output and walk the layers backwards, using the
region analysis (``region.analyse``) for the stable sets. For a DEQ layer with
``s = W z* + u``, ``D = diag(relu'(s))``, the row ``c'`` w.r.t. ``z*`` becomes the row w.r.t. ``u``

    h = D (c' + W^T h)         (the DEQ's own adjoint system; h = J^T c', J = (I - D W)^-1 D),

with ``D`` between ``D_lo`` (1 on neurons active over the whole ball) and ``Dbar`` (0 on neurons
inactive over the whole ball). ``A = Dbar |W|^T`` has ``rho(A) < 1`` PROVED per sample by
``neumann.rho_direction`` (else that sample falls back), so ``h = sum_k (D W^T)^k D c'`` and

* elementwise: ``|h| <= M``, the proved ``(I - A)^-1 Dbar |c'|`` bound (``neumann_bound``);
  affine layers: ``|A^T g| <= |A|^T |g|``; ReLU: ``|d g| <= dbar |g|``.
* local: interval arithmetic on the unrolled iteration ``h_0 = 0``, ``h_{k+1} = D (c' + W^T h_k)``
  with ``D`` ranging over the region's set (relu_mult), which encloses ``h_K`` for every
  admissible ``(D, c')``; the truncation error is ``h* - h_K = (D W^T)^K h*``, so
  ``|h* - h_K| <= A^K M`` (PROVEN tail). Every K gives an enclosure, so the enclosures of all
  K are intersected. K stops when the tail is below ``tail_rtol`` of the enclosure's l1 size (or
  at ``max_unroll``). Affine layers and ReLUs: interval arithmetic (``backprop``).

Unavailable rows (no proof of ``rho(A) < 1``) are ``+inf`` (elementwise) or centre 0, radius
``+inf`` (local), never NaN; they stay inf unless an exactly-zero coefficient removes them
(``backprop`` module docstring). ``c'`` on neurons inactive over the whole ball is replaced by 0
before the DEQ: ``h_i = D_i (...) = 0`` there for any ``c'``, even an unbounded one.
"""
from __future__ import annotations

import math

import torch

from .backprop import abs_apply, affine_back, relu_mult, rep
from .closed_form import dual_norm
from .layers import gamma
from .neumann import NonnegOp, neumann_bound, rho_direction, state_fan


def _deq_setup(lr, n_rows):
    """(A, v, ok_rows): the nonnegative operator, the rho-proof direction, rows that have it."""
    if "A" not in lr.cache:
        dbar = (~lr.inactive).to(lr.c.dtype)
        A = NonnegOp(lr.op, dbar, lr.in_shape)
        v, ok = rho_direction(A)
        lr.cache.update(A=A, v=v, ok=ok)
    return lr.cache["A"], lr.cache["v"], rep(lr.cache["ok"], n_rows)


def _view(t, like):
    return t.view((-1,) + (1,) * (like.dim() - 1))


def _drop_inactive(lr, t):
    """``t`` with the entries of neurons inactive over the whole ball set to 0 (D_i = 0 there)."""
    return torch.where(rep(lr.inactive, t.shape[0]), torch.zeros_like(t), t)


def deq_elementwise(lr, ga):
    """(N, *state) bound on |h| from ``ga >= |c'|`` (may hold inf); inf rows where unproved."""
    A, v, ok = _deq_setup(lr, ga.shape[0])
    ga = _drop_inactive(lr, ga)
    b = torch.where(_view(ok, ga), ga, torch.zeros_like(ga))
    M, okM = neumann_bound(A, b, v)
    return torch.where(_view(ok & okM, ga), M, torch.full_like(M, math.inf))


def deq_local(lr, gc, gr, max_unroll=500, tail_rtol=1e-6, min_unroll=2, info=None):
    """Enclosure (centre, radius) of h for every admissible (D, c' in [gc -+ gr]); unproved rows
    get centre 0 and radius inf."""
    op, n = lr.op, gc.shape[0]
    A, v, ok = _deq_setup(lr, n)
    act, inact = rep(lr.active, n), rep(lr.inactive, n)
    gc, gr = _drop_inactive(lr, gc), _drop_inactive(lr, gr)
    b = torch.where(_view(ok, gc), gc.abs() + gr, torch.zeros_like(gc))
    M, okM = neumann_bound(A, b, v)
    ok = ok & okM
    # unproved rows (possibly unbounded c') are dropped from the unroll: finite arithmetic below
    zero_bad = _view(~ok, gc)
    gc, gr = gc.masked_fill(zero_bad, 0), gr.masked_fill(zero_bad, 0)
    M = M.masked_fill(zero_bad, 0)
    gam = gamma(gc.dtype, state_fan(lr.in_shape))
    hc, hr = torch.zeros_like(gc), torch.zeros_like(gc)
    tail = M
    best_lo, best_hi = -M, M  # K = 0: h* in [-M, M]
    k = 0
    for k in range(1, max_unroll + 1):
        tc = gc + op.WT(hc)
        tr = gr + op.absWT(hr) + gam * (gc.abs() + gr + op.absWT(hc.abs() + hr))
        hc, hr = relu_mult(tc, tr, act, inact)
        tail = A(tail)
        lo, hi = hc - hr - tail, hc + hr + tail
        best_lo, best_hi = torch.maximum(best_lo, lo), torch.minimum(best_hi, hi)
        size = (hc.abs() + hr).flatten(1).sum(1)
        small = tail.flatten(1).sum(1) <= tail_rtol * size
        if k >= min_unroll and bool((small | ~ok).all()):
            break
    if info is not None:
        info.setdefault("unroll", []).append(k)
    c, r = (best_lo + best_hi) / 2, (best_hi - best_lo) / 2
    r = r + 2 * torch.finfo(c.dtype).eps * torch.maximum(best_lo.abs(), best_hi.abs())
    okv = _view(ok, r)
    return torch.where(okv, c, torch.zeros_like(c)), torch.where(okv, r, torch.full_like(r, math.inf))


@torch.no_grad()
def propagate(region, shapes, C_rows, method, opts, info=None):
    """(N,) bounds on the dual norm of every row's gradient, or inf for rows without one (never
    NaN). C_rows (N, *out_shape); opts: norm, max_unroll, tail_rtol."""
    layers, norm = region.layers, opts["norm"]
    gc, gr = C_rows, torch.zeros_like(C_rows)
    n = gc.shape[0]
    for j in range(len(layers) - 1, -1, -1):
        layer, lr = layers[j], region.per_layer[j]
        if layer.kind == "affine":
            if gr is not None:  # local, or elementwise before its first nonlinearity (exact)
                gc, gr = affine_back(layer, gc, gr, shapes[j])
            else:  # elementwise: gc holds |g| upper bounds, gr is unused
                gc = abs_apply(lambda t: layer.abs_t(t, shapes[j]), gc) * (1 + gamma(gc.dtype, layer.fan_t))
        elif method == "local":
            if layer.kind == "relu":
                gc, gr = relu_mult(gc, gr, rep(lr.active, n), rep(lr.inactive, n))
            else:
                gc, gr = deq_local(lr, gc, gr, opts["max_unroll"], opts["tail_rtol"], info=info)
        else:
            if gr is not None:  # first nonlinearity: switch to absolute values
                gc, gr = gc.abs() + gr, None
            if layer.kind == "relu":
                gc = _drop_inactive(lr, gc)  # exact zeros, also of inf entries
            else:
                gc = deq_elementwise(lr, gc)
    if gr is None:
        return dual_norm(gc, norm)
    return dual_norm(gc.abs() + gr, norm)
